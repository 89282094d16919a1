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
from typing import Optional, Sequence

import torch

from ltcache import interrupts
from ltcache.devices import resolve_device
from ltcache.errors import LtcacheError
from ltcache.options import SELECTS
from ltcache.progress import echo
from ltcache.stage2.checks import preflight
from ltcache.stage2.evaluate import Evaluator
from ltcache.stage2.methods import Method
from ltcache.stage2.plan import _load_cache, _train_data, needs_val, parse_seeds, plan_runs, train_view_names
from ltcache.stage2.precision import check_precision
from ltcache.stage2.requirements import Checked, check, require_stage1, require_val
from ltcache.stage2.results import build_results
from ltcache.stage2.sweep import train_sweep


def run_sweep(cache, plans: list[tuple[Method, dict, dict]], seeds: Sequence[int], select: str = "last",
              test_views: str = "all", device: str = "auto", quiet: bool = False,
              jobs: Optional[int] = None, clean_view: bool = False, evaluate_test: bool = True,
              precision: str = "fp32") -> tuple[dict, list]:
    """Train/compute every plan x seed; returns (results dict, [(run dict, layer)]).

    Every run records its val metrics (``run["val"]``, when the cache has a val split) beside
    its test metrics. ``evaluate_test=False`` never reads the test split (selection sweeps).
    ``jobs``: worker processes for CPU sweeps of small heads (None: the cores torch may use; 1: none).
    ``clean_view``: also draw the clean train view (default: augmented views only, when present).
    ``precision``: the training GEMMs' arithmetic, fp32 (exact), bf16 or tf32 (CUDA) --
    :mod:`ltcache.stage2.precision`. ``cache``: a :class:`~ltcache.stage2.requirements.Checked`
    (what ``retrain``, ``bench`` and ``tune`` pass: the cache loaded and checked once), a loaded
    cache or a cache directory (then loaded and checked here)."""
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
    wall = time.perf_counter() - t0
    # 5. results
    results = build_results(cache, runs, stage1, wall, str(dev))
    results["stage1_val"] = stage1_val
    results["stage1_classifier"] = ck.stage1_fix is None           # False: the stage-1 row is a placeholder
    results["train_views"] = train_view_names(cache.splits["train"], clean_view)
    results["precision"] = precision
    echo(f"sweep: {len(runs)} runs ({len(runs_plan.configs)} trained) in {wall:.1f} s on {dev}", quiet)
    return results, list(zip(runs, layers))
