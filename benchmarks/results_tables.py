"""Markdown tables for the README from `ltcache bench` results.json files (run by hand).

    python benchmarks/results_tables.py runs/gpu/ir100/results/results.json            # one detailed table
    python benchmarks/results_tables.py --all-only IR100=runs/gpu/ir100/results/results.json IR50=... IR10=...
"""
from __future__ import annotations

import argparse
import json


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def detailed(path: str) -> str:
    d = json.load(open(path))
    st = d["stage1"]
    rows = ["| method | All | Many | Medium | Few | ECE |", "|---|---|---|---|---|---|",
            f"| stage-1 head (no re-training) | {_f(st['all'])} | {_f(st['many'])} | {_f(st['medium'])} | "
            f"{_f(st['few'])} | {_f(st['ece'])} |"]
    for s in d["summary"]:
        name = s["name"] + (" (reference)" if s["method"] == "ce" else "")
        rows.append(f"| {name} | {_f(s['all_mean'])} ± {_f(s['all_std'])} | {_f(s['many'])} | {_f(s['medium'])} | "
                    f"{_f(s['few'])} | {_f(s['ece'])} |")
    return "\n".join(rows)


def all_only(pairs: list) -> str:
    res = {label: json.load(open(path)) for label, path in (p.split("=", 1) for p in pairs)}
    labels = list(res)
    by = {label: {s["method"]: s for s in d["summary"]} for label, d in res.items()}
    order = [s["method"] for s in res[labels[0]]["summary"]]
    rows = ["| method | " + " | ".join(f"{lab} All (rank)" for lab in labels) + " |",
            "|---|" + "---|" * len(labels),
            "| stage-1 head | " + " | ".join(_f(res[lab]["stage1"]["all"]) for lab in labels) + " |"]
    for m in order:
        cells = []
        for lab in labels:
            ms = [s["method"] for s in res[lab]["summary"]]
            s = by[lab][m]
            cells.append(f"{_f(s['all_mean'])} ± {_f(s['all_std'])} ({ms.index(m) + 1})")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--all-only", action="store_true", help="one All column per LABEL=results.json")
    a = ap.parse_args(argv)
    print(all_only(a.files) if a.all_only else "\n\n".join(detailed(f) for f in a.files))


if __name__ == "__main__":
    main()
