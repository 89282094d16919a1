"""Markdown tables for the README from `ltcache bench` results.json files (run by hand).

    python benchmarks/results_tables.py runs/gpu/ir100/results/results.json            # one detailed table
    python benchmarks/results_tables.py --all-only IR100=runs/gpu/ir100/results/results.json IR50=... IR10=...
    python benchmarks/results_tables.py --tuned runs/tune-bundled/results.json                  # `ltcache tune`'s table
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


def _ranks(values: list) -> list:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    r = [0] * len(values)
    for pos, i in enumerate(order):
        r[i] = pos + 1
    return r


def spearman(a: list, b: list) -> float:
    """Spearman rank correlation of two score lists (no ties expected)."""
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def tuned(path: str) -> str:
    """The README's tuned table from `ltcache tune`'s results.json: tuned test All (rank), Many,
    Medium, the val score of the pick, the preset's All (rank) and the values chosen on val;
    followed by the Spearman correlation of the preset and tuned rankings."""
    d = json.load(open(path))
    table = d["tune"]["table"]
    st, sv = d["stage1"], d.get("stage1_val") or {}
    tuned_rank = _ranks([t["all_mean"] for t in table])
    preset_rank = _ranks([t["preset_all_mean"] for t in table])
    rows = ["| method | tuned All (rank) | Many | Medium | val-balanced | preset All (rank) | chosen on val |",
            "|---|---|---|---|---|---|---|",
            f"| stage-1 head (no re-training) | {_f(st['all'])} | {_f(st['many'])} | {_f(st['medium'])} | "
            f"{_f(sv.get('balanced'))} | | |"]
    for t, rt, rp in zip(table, tuned_rank, preset_rank):
        chosen = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["chosen"].items()) or "-"
        name = t["method"] + (" (reference)" if t["method"] == "ce" else "")
        rows.append(f"| {name} | {_f(t['all_mean'])} ± {_f(t['all_std'])} ({rt}) | {_f(t['many'])} | "
                    f"{_f(t['medium'])} | {_f(t['val_score'])} | {_f(t['preset_all_mean'])} ± "
                    f"{_f(t['preset_all_std'])} ({rp}) | {chosen} |")
    rho = spearman([t["all_mean"] for t in table], [t["preset_all_mean"] for t in table])
    return "\n".join(rows) + f"\n\nSpearman (preset vs tuned ranks): {rho:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--all-only", action="store_true", help="one All column per LABEL=results.json")
    ap.add_argument("--tuned", action="store_true", help="the tuned table of `ltcache tune` results.json files")
    a = ap.parse_args(argv)
    if a.tuned:
        print("\n\n".join(tuned(f) for f in a.files))
    else:
        print(all_only(a.files) if a.all_only else "\n\n".join(detailed(f) for f in a.files))


if __name__ == "__main__":
    main()
