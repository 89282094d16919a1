"""The paper table of a multi-cache ``bench`` / ``tune``: methods as rows, datasets as column
groups (All, and Many / Medium / Few where the dataset has classes in them), each method's
average rank, the best value of each column marked, and each method's difference from a
reference method with a 95 % interval; terminal, markdown, CSV and LaTeX renderings.

Statistics. A cell is the mean ± sample standard deviation (n - 1) of the method's test
accuracy over all its runs on the dataset's caches: B backbones (caches of the dataset made by
stage-1 runs with different seeds) x S stage-2 seeds, n = B·S; the footer says B and S for
each dataset, and the CSV splits the spread into ``std_backbone`` (std of the B per-backbone
means) and ``std_seed`` (square root of the mean within-backbone variance). A method runs one
configuration per cache: ``tune``'s pick, or in ``bench`` the configuration with the best
mean val balanced accuracy (the first one when the cache has no val split; the footer says
so). Average rank: per dataset the methods are ranked by mean All (1 = best, ties share their
mean rank), and the ranks are averaged over the datasets the method ran on. Best in column:
the highest mean as printed (two decimals; ties all marked). Difference against the reference
(``--against``, default ce), on All: for every backbone b and stage-2 seed s on which both
ran, d_bs = acc_method(b, s) - acc_reference(b, s) (paired: same features, same seed), and
d_b the mean of d_bs over s. With B >= 2 backbones the interval is mean(d_b) ±
t(0.975, B-1)·sd(d_b)/sqrt(B): the backbones are the independent units, since the seeds of one
backbone share its features. With one backbone it falls back to the S seed differences
(t(0.975, S-1)), which measures stage-2 noise only and is labelled "seeds only". An interval
that holds 0 is a difference within the noise measured.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Optional

from ltcache.errors import LtcacheError

COLUMNS = ("all", "many", "medium", "few")
TITLES = {"all": "All", "many": "Many", "medium": "Medium", "few": "Few"}
# two-sided 95 % quantiles of Student's t, df 1..30 (beyond: the Cornish-Fisher expansion)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(values: list[float]) -> tuple[float, Optional[float], Optional[float]]:
    """(mean, low, high) of the 95 % t-interval of the mean; no interval for fewer than 2 values."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None, None
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


# ---------------------------------------------------------------------------------------------
# which runs make a cell
# ---------------------------------------------------------------------------------------------

def select_runs(doc: dict) -> tuple[dict, list[str]]:
    """{(cache index, method): [runs of its one configuration]} and the notes on how they were
    chosen (see the module docstring)."""
    by: dict[tuple, dict[str, list]] = {}
    for r in doc["runs"]:
        if doc.get("kind") == "tune" and r.get("tune_role", "tuned") != "tuned":
            continue
        if not r.get("metrics"):
            continue
        by.setdefault((r["cache"], r["method"]), {}).setdefault(r["name"], []).append(r)
    out, notes = {}, []
    for (c, m), configs in by.items():
        if len(configs) == 1:
            out[(c, m)] = next(iter(configs.values()))
            continue

        def val(runs):
            xs = [r["val"]["balanced"] for r in runs if r.get("val") and r["val"].get("balanced") is not None]
            return sum(xs) / len(xs) if xs else None
        scored = [(val(rs), i, name) for i, (name, rs) in enumerate(configs.items())]
        if all(s is not None for s, _, _ in scored):
            _, _, name = max(scored, key=lambda t: (t[0], -t[1]))
            out[(c, m)] = configs[name]
        else:
            name = next(iter(configs))
            out[(c, m)] = configs[name]
            notes.append(f"{m} on cache {c + 1}: the first of {len(configs)} configurations ({name}), no val "
                         "split to choose on")
    return out, notes


def _cell(values: dict[int, list[float]]) -> dict:
    """mean ± std over every (backbone, seed) value, and the spread split by backbone and seed."""
    flat = [v for vs in values.values() for v in vs]
    means = [sum(vs) / len(vs) for vs in values.values() if vs]
    within = [statistics.variance(vs) for vs in values.values() if len(vs) > 1]
    return {"mean": sum(flat) / len(flat), "std": statistics.stdev(flat) if len(flat) > 1 else None,
            "n": len(flat), "backbones": len(means),
            "std_backbone": statistics.stdev(means) if len(means) > 1 else None,
            "std_seed": math.sqrt(sum(within) / len(within)) if within else None}


def _ranks(scores: dict[str, float]) -> dict[str, float]:
    """1 = the highest score; ties share their mean rank."""
    order = sorted(scores, key=lambda m: -scores[m])
    out, i = {}, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for m in order[i:j + 1]:
            out[m] = (i + j) / 2 + 1
        i = j + 1
    return out


def compute(doc: dict, against: str = "ce") -> dict:
    """The paper table of a multi-cache results document (``ltcache.stage2.multi``)."""
    sel, notes = select_runs(doc)
    methods = list(dict.fromkeys(m for (_, m) in sel))
    if against not in methods:
        raise LtcacheError(f"--against {against}: the results have no method '{against}' (they hold "
                           f"{', '.join(methods)}); give one of them")
    datasets, rows = [], {m: {"method": m, "cells": {}, "ranks": {}, "diff": {}} for m in methods}
    for ds in doc["datasets"]:
        label, members = ds["label"], list(ds["caches"])
        cols = ["all"] + [g for g in ("many", "medium", "few") if g in ds.get("groups", [])]
        seeds = sorted({r["seed"] for c in members for m in methods for r in sel.get((c, m), [])})
        backbones = [doc["caches"][c]["backbone"] for c in members]
        datasets.append({"label": label, "columns": cols, "backbones": backbones, "seeds": seeds})
        for m in methods:
            for col in cols:
                vals = {c: [r["metrics"][col] for r in sel.get((c, m), []) if r["metrics"].get(col) is not None]
                        for c in members}
                vals = {c: v for c, v in vals.items() if v}
                if vals:
                    rows[m]["cells"][(label, col)] = _cell(vals)
            rows[m]["diff"][label] = _diff(sel, members, m, against)
        scores = {m: rows[m]["cells"][(label, "all")]["mean"] for m in methods if (label, "all") in rows[m]["cells"]}
        for m, r in _ranks(scores).items():
            rows[m]["ranks"][label] = r
    for r in rows.values():
        r["rank"] = sum(r["ranks"].values()) / len(r["ranks"]) if r["ranks"] else None
        missing = [d["label"] for d in datasets if d["label"] not in r["ranks"]]
        if missing and r["ranks"]:
            notes.append(f"{r['method']}: average rank over {len(r['ranks'])} of {len(datasets)} datasets "
                         f"(no run on {', '.join(missing)})")
    best = {}
    for d in datasets:
        for col in d["columns"]:
            shown = {m: round(rows[m]["cells"][(d["label"], col)]["mean"], 2) for m in methods
                     if (d["label"], col) in rows[m]["cells"]}
            if shown:
                top = max(shown.values())
                best[(d["label"], col)] = {m for m, v in shown.items() if v == top}
    ordered = sorted(rows.values(), key=lambda r: (r["rank"] is None, r["rank"] or 0, r["method"]))
    return {"datasets": datasets, "rows": ordered, "best": best, "against": against, "notes": notes,
            "kind": doc.get("kind", "bench")}


def _diff(sel: dict, members: list, m: str, ref: str) -> Optional[dict]:
    """Paired difference of ``m`` and ``ref`` on All over one dataset's backbones x seeds."""
    if m == ref:
        return None
    per_backbone, pairs = [], []
    for c in members:
        a = {r["seed"]: r["metrics"]["all"] for r in sel.get((c, m), []) if r["metrics"].get("all") is not None}
        b = {r["seed"]: r["metrics"]["all"] for r in sel.get((c, ref), []) if r["metrics"].get("all") is not None}
        d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
        if d:
            per_backbone.append(sum(d) / len(d))
            pairs += d
    if not pairs:
        return None
    units, over = (per_backbone, "backbones") if len(per_backbone) > 1 else (pairs, "seeds only")
    mean, lo, hi = t_interval(units)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(units), "over": over, "pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------
# renderings
# ---------------------------------------------------------------------------------------------

def _fmt_cell(cell: Optional[dict]) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")


def _fmt_diff(d: Optional[dict], dash: str = "-") -> str:
    if d is None:
        return dash
    if d["lo"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _grid(table: dict, mark: tuple[str, str]) -> tuple[list[str], list[str], list[list[str]]]:
    """(group row, header row, body rows) with best values wrapped in ``mark``."""
    ref = table["against"]
    groups, head = ["", ""], ["method", "avg rank"]
    for d in table["datasets"]:
        groups += [d["label"]] + [""] * (len(d["columns"]) - 1)
        head += [TITLES[c] for c in d["columns"]]
    for d in table["datasets"]:
        groups.append(f"{d['label']}")
        head.append(f"Δ vs {ref} [95 % CI]")
    body = []
    for r in table["rows"]:
        line = [r["method"] + (" (reference)" if r["method"] == ref else ""),
                "-" if r["rank"] is None else f"{r['rank']:.2f}"]
        for d in table["datasets"]:
            for c in d["columns"]:
                text = _fmt_cell(r["cells"].get((d["label"], c)))
                if r["method"] in table["best"].get((d["label"], c), ()):
                    text = mark[0] + text + mark[1]
                line.append(text)
        for d in table["datasets"]:
            line.append("ref." if r["method"] == ref else _fmt_diff(r["diff"].get(d["label"])))
        body.append(line)
    return groups, head, body


def footer(table: dict) -> list[str]:
    """What the numbers are: the error bars and intervals of each dataset, and the notes."""
    out = [f"Top-1 test accuracy (%), {'tuned on val' if table['kind'] == 'tune' else 'as run'}; "
           f"rows by average rank over datasets (on All); best of each column marked."]
    for d in table["datasets"]:
        b, s = len(d["backbones"]), len(d["seeds"])
        what = (f"{b} backbones ({', '.join(d['backbones'])}) x {s} stage-2 seeds" if b > 1 else
                f"1 backbone x {s} stage-2 seeds (stage-2 seeds only)")
        ci = "over backbones" if b > 1 else "over stage-2 seeds only"
        out.append(f"{d['label']}: mean ± std over {what}; Δ: paired difference from {table['against']} on All, "
                   f"95 % t-interval {ci}.")
    out += table["notes"]
    return out


def format_terminal(table: dict) -> str:
    """Fixed-width table for the terminal (best of each column marked with *)."""
    groups, head, body = _grid(table, ("", "*"))
    widths = [max(len(x) for x in col) for col in zip(groups, head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(groups), line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
                     + footer(table)) + "\n"


def format_markdown(table: dict) -> str:
    """GitHub markdown (best of each column in bold)."""
    groups, head, body = _grid(table, ("**", "**"))
    head = [f"{g} {h}".strip() if g else h for g, h in zip(_spread(groups), head)]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(md) + "\n\n" + "\n".join(footer(table)) + "\n"


def _spread(groups: list[str]) -> list[str]:
    """A group label repeated over every column it spans."""
    out, cur = [], ""
    for i, g in enumerate(groups):
        cur = g if g or i < 2 else cur
        out.append(cur)
    return out


def format_csv(table: dict) -> str:
    """One row per (dataset, method, column): the numbers behind every cell."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["dataset", "method", "column", "mean", "std", "n", "backbones", "std_backbone", "std_seed", "best",
                "rank", "avg_rank", "against", "diff_mean", "diff_lo", "diff_hi", "diff_over"])
    blank = lambda v: "" if v is None else v  # noqa: E731
    for d in table["datasets"]:
        for r in table["rows"]:
            diff = r["diff"].get(d["label"]) or {}
            for c in d["columns"]:
                cell = r["cells"].get((d["label"], c))
                if cell is None:
                    continue
                w.writerow([d["label"], r["method"], c, cell["mean"], blank(cell["std"]), cell["n"], cell["backbones"],
                            blank(cell["std_backbone"]), blank(cell["std_seed"]),
                            int(r["method"] in table["best"].get((d["label"], c), ())),
                            blank(r["ranks"].get(d["label"])), blank(r["rank"]), table["against"],
                            blank(diff.get("mean")) if c == "all" else "", blank(diff.get("lo")) if c == "all" else "",
                            blank(diff.get("hi")) if c == "all" else "", diff.get("over", "") if c == "all" else ""])
    return buf.getvalue()


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("Δ", r"$\Delta$")):
        s = s.replace(a, b)
    return s


def format_latex(table: dict) -> str:
    """A LaTeX tabular (booktabs): dataset column groups, best of each column in bold."""
    ref = table["against"]
    spec = "l" + "r" + "".join("|" + "r" * len(d["columns"]) for d in table["datasets"]) + "|" + \
        "r" * len(table["datasets"])
    out = [r"% ltcache paper table: " + _tex(" ".join(footer(table)[:1])), r"\begin{tabular}{" + spec + "}",
           r"\toprule"]
    top = [" ", " "] + [rf"\multicolumn{{{len(d['columns'])}}}{{c}}{{{_tex(d['label'])}}}" for d in table["datasets"]]
    top.append(rf"\multicolumn{{{len(table['datasets'])}}}{{c}}{{$\Delta$ vs {_tex(ref)} (All, 95\% CI)}}")
    out.append(" & ".join(top) + r" \\")
    head = ["Method", "Avg.\\ rank"] + [TITLES[c] for d in table["datasets"] for c in d["columns"]] + \
        [_tex(d["label"]) for d in table["datasets"]]
    out += [" & ".join(head) + r" \\", r"\midrule"]
    for r in table["rows"]:
        cells = [_tex(r["method"]), "-" if r["rank"] is None else f"{r['rank']:.2f}"]
        for d in table["datasets"]:
            for c in d["columns"]:
                cell = r["cells"].get((d["label"], c))
                text = "-" if cell is None else (f"{cell['mean']:.2f}" + (
                    rf"$\pm${cell['std']:.2f}" if cell["std"] is not None else ""))
                if r["method"] in table["best"].get((d["label"], c), ()):
                    text = rf"\textbf{{{text}}}"
                cells.append(text)
        for d in table["datasets"]:
            cells.append("ref." if r["method"] == ref else _tex(_fmt_diff(r["diff"].get(d["label"]))))
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += ["% " + _tex(line) for line in footer(table)[1:]]
    return "\n".join(out) + "\n"


FORMATTERS = {"terminal": format_terminal, "markdown": format_markdown, "csv": format_csv, "latex": format_latex}


def render(doc: dict, fmt: str = "terminal", against: Optional[str] = None) -> str:
    """The paper table of a multi-cache results document in one format."""
    if fmt not in FORMATTERS:
        raise LtcacheError(f"unknown --format '{fmt}'; use one of: {', '.join(FORMATTERS)}")
    return FORMATTERS[fmt](compute(doc, against or doc.get("against") or "ce"))


def load_multi(path) -> dict:
    """A multi-cache results document (results.json or its folder); one-line errors otherwise."""
    import json
    from pathlib import Path

    from ltcache.stage2.multi import is_multi
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise LtcacheError(f"{p}: no such file; give the results.json of a `bench` / `tune` over several --cache")
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise LtcacheError(f"{p} is unreadable ({str(exc).splitlines()[0]}); re-run the bench / tune") from None
    if not is_multi(doc):
        raise LtcacheError(f"{p} holds the runs of one cache; the paper table needs a `bench` / `tune` over several "
                           "caches (--cache A --cache B ...)")
    return doc


def resolve_against(doc: dict, against: Optional[str]) -> str:
    """The reference method: ``against`` (an alias is resolved when the method is registered) or
    the one the run recorded."""
    if against is None:
        return doc.get("against") or "ce"
    try:
        from ltcache.stage2.methods import get_method
        return get_method(against).name
    except LtcacheError:
        return against
