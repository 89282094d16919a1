"""The paper table of a multi-cache ``bench`` / ``tune``: methods as rows, datasets as column
groups (All, and Many / Medium / Few where the dataset has classes in them), each method's
average rank, the best value of each column marked, and each method's difference from a
reference method with a 95 % interval.

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
that holds 0 is a difference within the noise measured. Renderings: :mod:`ltcache.stage2.paper_format`.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional

from ltcache.errors import LtcacheError

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
