"""Load and check a results JSON (ARCHITECTURE.md "Results JSON") and pool its seeds per configuration."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ltcache.errors import LtcacheError
from ltcache.groups import GROUPS, shot_groups

SCHEMA = "ltcache-results/1"
RERUN = "re-run `ltcache bench`"
N_BINS = 15
# per-class arrays every metrics block carries (length K); "weight_norm" may be null
PER_CLASS = ("per_class_acc", "lm", "rsd", "mean_logit", "margin")
SCALARS = ("all", "many", "medium", "few", "ece", "nll")
STAGE1 = "stage-1 head"


@dataclass
class Series:
    """One configuration (a run name, seeds pooled) or the stage-1 head: what the figures draw."""

    name: str
    method: str
    seeds: list
    runs: list                       # the metrics blocks, one per seed
    all_mean: Optional[float] = None
    all_std: float = 0.0
    groups: dict = field(default_factory=dict)      # many/medium/few -> (mean, std) or None
    ece: Optional[float] = None
    nll: Optional[float] = None

    def per_class(self, key: str) -> list:
        """Mean over seeds of a per-class array (NaN where every seed is null)."""
        rows = [m[key] for m in self.runs if m.get(key) is not None]
        if not rows:
            return []
        return [_mean(col) if _mean(col) is not None else float("nan") for col in zip(*rows)]

    def reliability(self) -> tuple[list, list, list]:
        """Bins pooled over seeds: count-weighted mean confidence and accuracy, summed counts."""
        conf, acc, cnt = [0.0] * N_BINS, [0.0] * N_BINS, [0] * N_BINS
        for m in self.runs:
            rel = m["reliability"]
            for b in range(N_BINS):
                n = rel["bin_count"][b]
                conf[b] += n * rel["bin_conf"][b]
                acc[b] += n * rel["bin_acc"][b]
                cnt[b] += n
        return ([c / n if n else 0.0 for c, n in zip(conf, cnt)],
                [a / n if n else 0.0 for a, n in zip(acc, cnt)], cnt)


@dataclass
class Report:
    """The checked document plus the series to draw, best All first (stage-1 head kept apart)."""

    path: Path
    doc: dict
    class_counts: list
    class_names: list
    groups: list
    stage1: Series
    series: list                     # configurations, sorted by All (desc)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def order(self) -> list:
        """Class indices sorted by training count, largest first (ties: class index)."""
        return sorted(range(self.num_classes), key=lambda j: (-self.class_counts[j], j))

    def all_series(self) -> list:
        """The stage-1 head first, then every configuration by All."""
        return [self.stage1] + list(self.series)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mean(vals) -> Optional[float]:
    vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _std(vals) -> float:
    vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.pstdev(vals) if len(vals) > 1 else 0.0


def _check_metrics(m, where: str, k: int, fname: str) -> None:
    """Every field a figure reads, with its length; raises naming the first one missing."""
    def fail(what: str):
        raise LtcacheError(f"{fname}: {where} {what}; {RERUN}")

    if not isinstance(m, dict):
        fail("has no metrics block")
    for key in SCALARS:
        if key not in m:
            fail(f"has no metrics.{key}")
        if m[key] is not None and not _is_num(m[key]):
            fail(f"has a non-numeric metrics.{key}")
    for key in PER_CLASS + ("weight_norm",):
        if key not in m:
            fail(f"has no metrics.{key}")
        v = m[key]
        if v is None and key == "weight_norm":
            continue
        if not isinstance(v, list):
            fail(f"has no list in metrics.{key}")
        if len(v) != k:
            fail(f"has {len(v)} values in metrics.{key}, expected {k} (one per class)")
        if any(x is not None and not _is_num(x) for x in v):
            fail(f"has a non-numeric value in metrics.{key}")
    for key in ("lm_groups", "rsd_groups"):
        if not isinstance(m.get(key), dict):
            fail(f"has no metrics.{key}")
        for g in GROUPS:
            if g not in m[key]:
                fail(f"has no metrics.{key}.{g}")
    rel = m.get("reliability")
    if not isinstance(rel, dict):
        fail("has no metrics.reliability")
    for key in ("bin_conf", "bin_acc", "bin_count"):
        if key not in rel:
            fail(f"has no metrics.reliability.{key}")
        if not isinstance(rel[key], list) or len(rel[key]) != N_BINS or not all(_is_num(x) for x in rel[key]):
            fail(f"has no {N_BINS} numbers in metrics.reliability.{key}")


def read_results(path) -> dict:
    """The parsed JSON, or a one-line LtcacheError (missing file, not JSON, wrong schema)."""
    p = Path(path)
    if not p.exists():
        raise LtcacheError(f"results file '{p}' does not exist; make one with `ltcache bench --out DIR` "
                           "or `ltcache retrain --out FILE`")
    if p.is_dir():
        if (p / "results.json").is_file():
            p = p / "results.json"
        else:
            raise LtcacheError(f"'{p}' is a directory without results.json; pass the results.json "
                               "written by `ltcache bench --out DIR`")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LtcacheError(f"{p.name}: not valid JSON ({msg}); pass the results.json written by "
                           "`ltcache bench`") from None
    except OSError as exc:
        raise LtcacheError(f"cannot read results file '{p}': {exc.strerror or exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise LtcacheError(f"{p.name}: schema is {got!r}, expected '{SCHEMA}'; pass the results.json "
                           "written by `ltcache bench` or `ltcache retrain`")
    doc["_path"] = str(p)
    return doc


def _series(name: str, method: str, runs: list) -> Series:
    ms = [r["metrics"] for r in runs]
    s = Series(name=name, method=method, seeds=[r.get("seed") for r in runs], runs=ms)
    alls = [m["all"] for m in ms]
    s.all_mean, s.all_std = _mean(alls), _std(alls)
    for g in GROUPS:
        vals = [m[g] for m in ms]
        mu = _mean(vals)
        s.groups[g] = None if mu is None else (mu, _std(vals))
    s.ece, s.nll = _mean(m["ece"] for m in ms), _mean(m["nll"] for m in ms)
    return s


def select_runs(runs: list, methods: Optional[Sequence[str]], fname: str) -> list:
    """Runs whose configuration name or method name is in ``methods`` (all when None)."""
    if not methods:
        return runs
    names = {r["name"] for r in runs}
    kinds = {r["method"] for r in runs}
    unknown = [m for m in methods if m not in names and m not in kinds]
    if unknown:
        avail = sorted(kinds) + sorted(names - kinds)
        raise LtcacheError(f"--methods: {', '.join(repr(u) for u in unknown)} not in {fname}; "
                           f"available: {', '.join(avail)}")
    want = set(methods)
    return [r for r in runs if r["name"] in want or r["method"] in want]


def load_report(path, methods: Optional[Sequence[str]] = None) -> Report:
    """Read, check and pool a results file into the series the figures draw."""
    doc = read_results(path)
    p = Path(doc["_path"])
    fname = p.name
    cache = doc.get("cache")
    if not isinstance(cache, dict) or not isinstance(cache.get("class_counts"), list) or not cache["class_counts"]:
        raise LtcacheError(f"{fname}: has no cache.class_counts; {RERUN}")
    counts = cache["class_counts"]
    if not all(_is_num(c) and c >= 0 for c in counts):
        raise LtcacheError(f"{fname}: cache.class_counts must be non-negative numbers; {RERUN}")
    counts = [int(c) for c in counts]
    k = len(counts)
    names = cache.get("class_names")
    names = [str(n) for n in names] if isinstance(names, list) and len(names) == k else [str(j) for j in range(k)]
    groups = cache.get("groups")
    groups = list(groups) if isinstance(groups, list) and len(groups) == k else shot_groups(counts)
    if "stage1" not in doc:
        raise LtcacheError(f"{fname}: has no stage1 block; {RERUN}")
    _check_metrics(doc["stage1"], "stage1", k, fname)
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise LtcacheError(f"{fname}: has no runs; {RERUN}")
    for i, r in enumerate(runs):
        if not isinstance(r, dict):
            raise LtcacheError(f"{fname}: runs[{i}] is not an object; {RERUN}")
        for key in ("name", "method", "seed"):
            if key not in r:
                raise LtcacheError(f"{fname}: runs[{i}] has no {key}; {RERUN}")
        r["name"], r["method"] = str(r["name"]), str(r["method"])
        if "metrics" not in r:
            raise LtcacheError(f"{fname}: run '{r['name']}' seed {r['seed']} has no metrics; {RERUN}")
        _check_metrics(r["metrics"], f"run '{r['name']}' seed {r['seed']}", k, fname)
    runs = select_runs(runs, methods, fname)
    by: dict = {}
    for r in runs:
        by.setdefault(r["name"], []).append(r)
    series = [_series(n, rs[0]["method"], rs) for n, rs in by.items()]
    series.sort(key=lambda s: (s.all_mean is None, -(s.all_mean or 0.0)))
    stage1 = _series(STAGE1, "stage1", [{"seed": None, "metrics": doc["stage1"]}])
    stage1.seeds = []
    return Report(path=p, doc=doc, class_counts=counts, class_names=names, groups=groups,
                  stage1=stage1, series=series)
