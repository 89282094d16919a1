"""Results of a stage-2 sweep: the JSON document, its summary, CSV / markdown / terminal tables."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence, Union

from ltcache.version import __version__
from ltcache.groups import shot_groups
from ltcache.metrics import fmt_pct

SCHEMA = "ltcache-results/1"
SUMMARY_FIELDS = ("name", "method", "n_seeds", "all_mean", "all_std", "many", "medium", "few", "ece", "nll",
                  "lm_many", "lm_medium", "lm_few", "rsd_many", "rsd_medium", "rsd_few",
                  "val_all", "val_balanced", "val_many", "val_medium", "val_few", "val_nll", "val_ece")


def _cache_block(cache) -> dict:
    man = dict(getattr(cache, "manifest", None) or {})
    ckpt = man.get("checkpoint") if isinstance(man.get("checkpoint"), dict) else {}
    counts = [int(c) for c in list(cache.class_counts)]
    path = getattr(cache, "path", None) or getattr(cache, "root", None)
    if path and Path(path).exists():
        path = Path(path).resolve()              # which cache was used, wherever the results file goes
    return {"path": str(path or ""), "dataset": man.get("dataset"),
            "class_names": list(getattr(cache, "class_names", None) or [str(i) for i in range(len(counts))]),
            "class_counts": counts,
            "groups": list(getattr(cache, "groups", None) or shot_groups(counts)),
            "feature_dim": int(cache.feature_dim),
            "checkpoint_sha256": man.get("checkpoint_sha256") or ckpt.get("sha256")}


def _mean(vals) -> Optional[float]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


VAL_FIELDS = ("all", "balanced", "many", "medium", "few", "nll", "ece")


def summarize(runs: Sequence[dict]) -> list[dict]:
    """One row per run name (seeds pooled): mean +- std of test All, means of the rest, and the
    val metrics (``val_*``, means over seeds); sorted by test All (by val when a sweep never
    read test)."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["name"], []).append(r)
    rows = []
    for name, rs in by.items():
        tested = [r["metrics"] for r in rs if r.get("metrics")]
        alls = [m["all"] for m in tested if m["all"] is not None]
        row = {"name": name, "method": rs[0]["method"], "params": rs[0]["params"],
               "seeds": [r["seed"] for r in rs], "n_seeds": len(rs),
               "all_mean": _mean(alls), "all_std": statistics.pstdev(alls) if len(alls) > 1 else 0.0}
        failed = [f"seed {r['seed']}: {r['failed']}" for r in rs if r.get("failed")]
        if failed:
            row["failed"] = "; ".join(failed)          # a diverged configuration: its numbers mean nothing
        for key in ("many", "medium", "few", "ece", "nll"):
            row[key] = _mean(m[key] for m in tested)
        for g in ("many", "medium", "few"):
            row[f"lm_{g}"] = _mean(m["lm_groups"][g] for m in tested)
            row[f"rsd_{g}"] = _mean(m["rsd_groups"][g] for m in tested)
        for key in VAL_FIELDS:
            row[f"val_{key}"] = _mean(r["val"][key] for r in rs if r.get("val"))
        rows.append(row)
    rows.sort(key=lambda r: (r["all_mean"] is None, -(r["all_mean"] if r["all_mean"] is not None
                                                        else (r["val_balanced"] or -1e9))))
    return rows


def build_results(cache, runs: list, stage1: dict, wall_time_s: float, device: str) -> dict:
    """The results JSON document (ARCHITECTURE.md "Results JSON")."""
    return {"schema": SCHEMA, "ltcache_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cache": _cache_block(cache), "wall_time_s": float(wall_time_s), "device": device,
            "threads": _threads(), "world_size": _world(), "stage1": stage1, "runs": runs, "summary": summarize(runs)}


def _threads() -> int:
    import torch
    return int(torch.get_num_threads())


def _world() -> int:
    from ltcache import distributed
    return distributed.world() if distributed.active() else 1


def run_header(cache, preset: str, device, what: str) -> str:
    """What a stage-2 command is about to do: ``bench: cache PATH (dataset, IR ...), preset P, device D,
    N threads, world size W`` (the results record the same: cache, preset, device, threads, world_size)."""
    block = _cache_block(cache)
    n = _threads()
    return (f"{what}: {cache_line({'cache': block})[len('cache: '):]}; preset {preset}, device {device}, "
            f"{n} thread{'s' * (n != 1)}, world size {_world()}")


def _num(v, fmt="{:.3f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (CE re-train row marked as the reference)."""
    head = ["method", "All", "Many", "Medium", "Few", "ECE", "NLL", "LM m/m/f", "RSD m/m/f"]
    rows = [["stage-1 head", fmt_pct(results["stage1"]["all"]), fmt_pct(results["stage1"]["many"]),
             fmt_pct(results["stage1"]["medium"]), fmt_pct(results["stage1"]["few"]),
             _num(results["stage1"]["ece"], "{:.2f}"), _num(results["stage1"]["nll"]),
             "/".join(_num(results["stage1"]["lm_groups"][g], "{:.2f}") for g in ("many", "medium", "few")),
             "/".join(_num(results["stage1"]["rsd_groups"][g], "{:.2f}") for g in ("many", "medium", "few"))]]
    if results.get("stage1_classifier") is False:          # an imported cache without a stage-1 head
        rows = []
    for r in results["summary"]:
        name = (r["name"] + (" (reference)" if r["method"] == "ce" and results.get("reference_added", True) else "")
                + (" [FAILED: non-finite]" if r.get("failed") else ""))
        rows.append([name, fmt_pct(r["all_mean"], r["all_std"] if r["n_seeds"] > 1 else None),
                     fmt_pct(r["many"]), fmt_pct(r["medium"]), fmt_pct(r["few"]), _num(r["ece"], "{:.2f}"),
                     _num(r["nll"]), "/".join(_num(r[f"lm_{g}"], "{:.2f}") for g in ("many", "medium", "few")),
                     "/".join(_num(r[f"rsd_{g}"], "{:.2f}") for g in ("many", "medium", "few"))])
    return head, rows


def cache_line(results: dict) -> str:
    """``cache: <path> (<dataset> IR <ir>, <n> classes)`` -- which cache a table's numbers come from."""
    c = results.get("cache") or {}
    ds = c.get("dataset")
    name = (ds.get("name") or ds.get("source")) if isinstance(ds, dict) else ds
    counts = [int(n) for n in c.get("class_counts") or []]
    from ltcache.imbalance import ir_text
    ir = ir_text(ds.get("imb_ratio") if isinstance(ds, dict) else None, counts)
    desc = str(name or "unknown dataset") + (f" {ir}" if ir else "")
    return f"cache: {c.get('path') or 'unknown'} ({desc}, {len(counts)} classes)"


def format_table(results: dict) -> str:
    """A readable fixed-width terminal table (after a line naming the cache) plus the sweep's wall time."""
    head, rows = table_rows(results)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [cache_line(results), line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    n = len(results["runs"])
    out.append(f"{n} runs in {results['wall_time_s']:.1f} s on {results['device']} "
               "(top-1 %, mean ± std over seeds; ECE %, 15 bins)")
    out += table_notes(results)
    return "\n".join(out)


LM_RSD_NOTE = ("LM (Logits Magnitude, LOS paper, ICLR 2025): per class, the mean of its logit on its own test "
               "samples minus the mean on the others', / the mean |LM| over classes.\n"
               "RSD (Regularized Standard Deviation): the std of that logit on its own samples / the raw LM; "
               "'-' where LM <= 0 (undefined). m/m/f: Many/Medium/Few means.")


def table_notes(results: dict) -> list[str]:
    """The lines under a table that say what its columns and labelled rows are."""
    notes = [LM_RSD_NOTE]
    if results.get("reference_added") and any(r["method"] == "ce" for r in results.get("summary", [])):
        notes.append("(reference): plain CE re-trained with the sweep's options, added as the baseline "
                     "(--methods did not name ce).")
    sets = results.get("feature_sets") or {}
    for name in sorted(set(sets.values())):
        methods = ", ".join(m for m, s in sets.items() if s == name)
        notes.append(f"{methods}: on the cache's {name} feature set (the BatchNorm statistics its source's "
                     "stage 2 sees; the other rows: the main features).")
    return notes


def format_markdown(results: dict) -> str:
    """The summary table as GitHub markdown (after a line naming the cache)."""
    head, rows = table_rows(results)
    md = [cache_line(results), "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md.append("")
    md.append(f"{len(results['runs'])} runs, wall time {results['wall_time_s']:.1f} s on {results['device']}.")
    md += [""] + table_notes(results)
    return "\n".join(md) + "\n"


def write_json(results: dict, path: Union[str, Path]) -> Path:
    """Write the results JSON atomically (a temporary name in the same folder, then a rename: ``path``
    holds the previous file or the new one, never half of one). NaN never appears: missing values are
    null. OS errors become a one-line LtcacheError."""
    from ltcache.outputs import atomic_write
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1, allow_nan=False)
    return path


def write_all(results: dict, out_dir: Union[str, Path]) -> dict:
    """results.json, summary.csv and summary.md in ``out_dir``, each written atomically; returns their
    paths. (Replacing existing files is the caller's decision: the CLI refuses without --force.)"""
    import io
    from ltcache.errors import os_error
    from ltcache.outputs import atomic_write
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out) from None
    buf = io.StringIO(newline="")                # render everything before the first write
    w = csv.writer(buf)
    w.writerow(SUMMARY_FIELDS + ("seeds", "params"))
    for r in results["summary"]:
        w.writerow([("" if r[f] is None else r[f]) for f in SUMMARY_FIELDS]
                   + [" ".join(map(str, r["seeds"])), json.dumps(r["params"], sort_keys=True)])
    texts = {"csv": buf.getvalue(), "md": format_markdown(results)}
    paths = {"json": write_json(results, out / "results.json"), "csv": out / "summary.csv",
             "md": out / "summary.md"}
    for key in ("csv", "md"):
        with atomic_write(paths[key], "w", encoding="utf-8", newline="") as fh:
            fh.write(texts[key])
    return paths
