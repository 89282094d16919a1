"""``run_sweep``: one sweep over planned methods x seeds, shared by ``retrain``, ``bench``
(:mod:`ltcache.stage2.api`) and ``tune`` (:mod:`ltcache.stage2.tune`), a module a step:

1. :mod:`~ltcache.stage2.plan`: the cache's :class:`TrainData` and one :class:`Config` per
   (method, grid point, seed) to train, the closed forms beside them;
2. and 3. :mod:`~ltcache.stage2.sweep`: configurations in groups
   (:mod:`~ltcache.stage2.grouping`), placed by the scheduler (:mod:`~ltcache.stage2.workers`:
   groups side by side in processes, or across ranks), each group trained as one batched
   computation (:mod:`~ltcache.stage2.group`);
4. :mod:`~ltcache.stage2.evaluate`: closed forms computed, every layer evaluated on test and val;
5. :mod:`~ltcache.stage2.results`: the results JSON dict (ARCHITECTURE.md "Results JSON").
"""
from __future__ import annotations

import time
from typing import NamedTuple, Optional, Sequence

import torch

from ltcache import interrupts
from ltcache.devices import resolve_device
from ltcache.errors import LtcacheError
from ltcache.options import SELECTS
from ltcache.progress import echo
from ltcache.stage2.checks import preflight
from ltcache.stage2.evaluate import Evaluator
from ltcache.stage2.methods import Method, run_name
from ltcache.stage2.plan import _load_cache, _train_data, needs_val, parse_seeds, plan_runs, train_view_names
from ltcache.stage2.precision import check_precision
from ltcache.stage2.requirements import Checked, check, require_stage1, require_val
from ltcache.stage2.results import build_results
from ltcache.stage2.sweep import train_sweep


def run_sweep(cache, plans: list[tuple[Method, dict, dict]], seeds: Sequence[int], select: str = "last",
              test_views: str = "all", device: str = "auto", quiet: bool = False,
              jobs: Optional[int] = None, clean_view: bool = False, evaluate_test: bool = True,
              precision: str = "fp32", feature_sets: bool = True) -> tuple[dict, list]:
    """Train/compute every plan x seed; returns (results dict, [(run dict, layer)]).

    Every run records its val metrics (``run["val"]``, when the cache has a val split) beside
    its test metrics. ``evaluate_test=False`` never reads the test split (selection sweeps).
    ``jobs``: worker processes for CPU sweeps of small heads (None: the cores torch may use; 1: none).
    ``clean_view``: also draw the clean train view (default: augmented views only, when present).
    ``precision``: the training GEMMs' arithmetic, fp32 (exact), bf16 or tf32 (CUDA) --
    :mod:`ltcache.stage2.precision`. ``feature_sets``: a method whose source runs BatchNorm in
    another mode trains on the cache's matching feature set when it has one
    (:mod:`ltcache.cache.feature_sets`; False: every method on the main features).
    ``cache``: a :class:`~ltcache.stage2.requirements.Checked` (what ``retrain``, ``bench`` and
    ``tune`` pass: the cache loaded and checked once), a loaded cache or a cache directory (then
    loaded and checked here)."""
    if jobs is not None and jobs < 1:
        raise LtcacheError(f"--jobs must be >= 1 (got {jobs}); 1 trains everything in this process")
    if select not in SELECTS:
        raise LtcacheError(f"unknown --select '{select}'; use last or val")
    dev = resolve_device(device)
    check_precision(precision, dev)
    ck = cache if isinstance(cache, Checked) else check(_load_cache(cache, dev))
    cache = ck.cache
    require_stage1(ck, plans)                           # a cache without a stage-1 classifier: refused before work
    seeds = parse_seeds(seeds)
    why = needs_val(plans, select)
    if why:
        require_val(ck, why)                            # before anything trains
    if evaluate_test and "test" not in cache.splits:
        raise LtcacheError("the cache has no test split; re-extract it with the test split")
    t0 = time.perf_counter()
    interrupts.test_point("sweep")
    parts = _feature_parts(ck, plans, dev, feature_sets, quiet)
    for part_ck, part_plans, set_name in parts[1:]:
        if why:
            require_val(part_ck, why)
        if evaluate_test and "test" not in part_ck.cache.splits:
            raise LtcacheError(f"feature set {set_name} has no test split; re-extract it with the test split")
    runs, layers, n_trained, stage1, stage1_val = _merge(parts, plans, lambda part_ck, part_plans: _sweep_part(
        part_ck, part_plans, seeds, select, test_views, dev, quiet, jobs, clean_view, evaluate_test, precision))
    wall = time.perf_counter() - t0
    # 5. results
    results = build_results(cache, runs, stage1, wall, str(dev))
    results["stage1_val"] = stage1_val
    results["stage1_classifier"] = ck.stage1_fix is None           # False: the stage-1 row is a placeholder
    results["train_views"] = train_view_names(cache.splits["train"], clean_view)
    results["precision"] = precision
    results["feature_sets"] = {p[0].name: name for _, part_plans, name in parts if name for p in part_plans}
    echo(f"sweep: {len(runs)} runs ({n_trained} trained) in {wall:.1f} s on {dev}", quiet)
    return results, list(zip(runs, layers))


def _merge(parts: list, plans: list, sweep) -> tuple:
    """Each part swept (``sweep(Checked, plans) -> _Part``), its runs merged in plan order; a run on a
    feature set records it (``run["features"]``); the stage-1 row is the main features'.
    (runs, layers, configurations trained, stage1, stage1_val)."""
    runs, layers, n_trained = [], [], 0
    for part_ck, part_plans, set_name in parts:
        part = sweep(part_ck, part_plans)
        if set_name is None:
            stage1, stage1_val = part.stage1, part.stage1_val
        for r in part.runs:
            if set_name is not None:
                r["features"] = set_name
        runs += part.runs
        layers += part.layers
        n_trained += part.n_trained
    order = {run_name(m, p, ov): i for i, (m, p, ov) in enumerate(plans)}
    ranked = sorted(range(len(runs)), key=lambda i: order.get(runs[i]["name"], len(order)))
    return [runs[i] for i in ranked], [layers[i] for i in ranked], n_trained, stage1, stage1_val


class _Part(NamedTuple):
    runs: list
    layers: list
    n_trained: int
    stage1: dict
    stage1_val: Optional[dict]


def _sweep_part(ck: Checked, plans: list, seeds: list, select: str, test_views: str, dev, quiet: bool,
                jobs: Optional[int], clean_view: bool, evaluate_test: bool, precision: str) -> _Part:
    """Steps 1-4 on one set of features (the cache's main features, or one feature set)."""
    cache = ck.cache
    # 1. plan: the cache's tensors, the runs and the configurations to train
    data = _train_data(cache, dev, test_views, clean_view, precision)
    counts = torch.as_tensor(cache.class_counts).long().cpu()
    runs_plan = plan_runs(plans, seeds, counts)
    preflight(runs_plan.configs, data)                  # plugin heads, samplers, losses: refused before work
    # 2.-3. groups, trained
    trained = (train_sweep(runs_plan.configs, data, select=select, quiet=quiet, n_jobs=jobs)
               if runs_plan.configs else [])
    # 4. evaluate: every run's layer (closed forms computed here), then the stage-1 head
    ev = Evaluator(cache, data, counts, test_views, evaluate_test)
    runs, layers = ev.runs(runs_plan.entries, trained)
    stage1, stage1_val = ev.stage1()
    return _Part(runs, layers, len(runs_plan.configs), stage1, stage1_val)


def _feature_parts(ck: Checked, plans: list, dev, use_sets: bool, quiet: bool) -> list:
    """The plans split by the features they train on: [(Checked, plans, set name or None)], the
    main features first (always present: they give the stage-1 row). A method whose entry names a
    feature set trains on it when the cache holds it (and ``use_sets``); otherwise on the main
    features, with a notice saying how to add the set."""
    from ltcache.cache import feature_sets as fs

    cache = ck.cache
    k = int(cache.num_classes)
    wanted = {p[0].name: p[0].feature_set(k) for p in plans}
    if not any(wanted.values()):
        return [(ck, plans, None)]
    have = fs.available(cache) if use_sets else {}
    main, by_set = [], {}
    for p in plans:
        name = wanted[p[0].name]
        if name and name in have:
            by_set.setdefault(name, []).append(p)
        else:
            main.append(p)
    for m, name in sorted({(n, s) for n, s in wanted.items() if s and s not in have}):
        why = ("as --main-features asked" if not use_sets else
               f"the cache has no {name} set; add it: ltcache extract --ckpt STAGE1 --cache CACHE --set {name}, "
               f"CACHE = {cache.path}")
        echo(f"{m}: its source's BatchNorm mode reads the {name} features; trained on the main features "
             f"({why})", quiet)
    parts = [(ck, main, None)]
    for name, set_plans in by_set.items():
        set_ck = check(_load_cache(have[name], dev))
        require_stage1(set_ck, set_plans)
        parts.append((set_ck, set_plans, name))
    return parts
