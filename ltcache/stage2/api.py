"""Public stage-2 entry points: ``retrain`` (one method), ``bench`` (a sweep of methods) and
``tune`` (:mod:`ltcache.stage2.tune`), over :func:`~ltcache.stage2.runner.run_sweep`, which
they share (it runs a sweep one way, a module a step: see :mod:`ltcache.stage2.runner`).

They take a loaded cache (``ltcache.cache.load(...)`` -> FeatureCache, or anything with the
same attributes) or a cache directory. The names the CLI and tests use are importable from
here (re-exported where they live in a step's module).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

from ltcache.devices import resolve_device
from ltcache.errors import LtcacheError
from ltcache.progress import echo
from ltcache.stage2.evaluate import VAL_METRICS, Evaluator, evaluate_layer, layer_logits, val_report  # noqa: F401
from ltcache.stage2.methods import METHODS, GENERIC, choose_preset, get_method, resolve_params, run_name
from ltcache.stage2.precision import PRECISIONS, check_precision  # noqa: F401
from ltcache.stage2.plan import (TEST_VIEWS, Config, TrainData, _load_cache, _train_data,  # noqa: F401
                                 _view_names, _views, expand, make_config, needs_val, parse_seeds, plan_runs,
                                 train_view_names, train_view_pool, val_gaps)
from ltcache.stage2.requirements import Checked, check, require_val, skip_stage1  # noqa: F401
from ltcache.stage2.results import run_header
from ltcache.stage2.runner import run_sweep
from ltcache.stage2.sweep import train_sweep  # noqa: F401
from ltcache.stage2.tune import load_choices, tune  # noqa: F401  (public here: ltcache.stage2.api.tune)


class Retrained(NamedTuple):
    """What :func:`retrain_layers` returns: the results dict, the (run dict, layer) of each seed,
    and the loaded cache (what an export of the first seed's head needs)."""
    results: dict
    pairs: list
    cache: Any


def retrain(cache, method: str, overrides: Optional[dict] = None, seeds: Sequence[int] = (0,),
            select: str = "last", test_views: str = "all", device: str = "auto", quiet: bool = False,
            preset: Optional[str] = None, jobs: Optional[int] = None, clean_view: bool = False,
            from_tune: Optional[Union[str, Path]] = None, precision: str = "fp32",
            main_features: bool = False) -> dict:
    """Re-train one method (with ``overrides`` of its hyper-parameters) for each seed.

    Returns the results JSON dict. A method whose source keeps BatchNorm in another mode trains on
    the cache's matching feature set when it holds one (``main_features``: on the main features). ``from_tune``: a ``tune`` results.json of this cache; its
    choice for the method, under any ``overrides``. To deploy the head with the stage-1 backbone,
    call :func:`retrain_layers` and :func:`ltcache.export.export_model` (``retrain --export``):
    stage 2 itself never imports the backbone's code.
    """
    return retrain_layers(cache, method, overrides, seeds, select, test_views, device, quiet, preset, jobs,
                          clean_view, from_tune, precision, main_features).results


def retrain_layers(cache, method: str, overrides: Optional[dict] = None, seeds: Sequence[int] = (0,),
                   select: str = "last", test_views: str = "all", device: str = "auto", quiet: bool = False,
                   preset: Optional[str] = None, jobs: Optional[int] = None, clean_view: bool = False,
                   from_tune: Optional[Union[str, Path]] = None, precision: str = "fp32",
                   main_features: bool = False) -> Retrained:
    """:func:`retrain`, returning the trained layers and the loaded cache beside the results."""
    dev = resolve_device(device)
    ck = check(_load_cache(cache, dev))                 # loaded and checked once; run_sweep trusts it
    cache = ck.cache
    m = get_method(method)
    if from_tune is not None:
        picks = load_choices(from_tune, cache)
        if m.name not in picks:
            raise LtcacheError(f"--from-tune {from_tune} has no choice for {m.name} (it tuned "
                               f"{', '.join(picks)}); drop --from-tune or tune {m.name}")
        overrides = {**picks[m.name], **(overrides or {})}
    pre = choose_preset(cache.num_classes, cache.feature_dim, preset)
    plans = expand([m.name], overrides, None, pre, int(cache.splits["train"].labels.numel()))
    echo(run_header(cache, pre, dev, "retrain"), quiet)
    results, pairs = run_sweep(ck, plans, seeds, select, test_views, device, quiet, jobs, clean_view,
                               precision=precision, feature_sets=not main_features)
    results["preset"] = pre
    return Retrained(results, pairs, cache)


def bench(cache, methods: Optional[Sequence[str]] = None, grid: Optional[dict] = None,
          seeds: Sequence[int] = (0,), select: str = "last", test_views: str = "all",
          device: str = "auto", quiet: bool = False, preset: Optional[str] = None,
          overrides: Optional[dict] = None, out_dir: Optional[Union[str, Path]] = None,
          jobs: Optional[int] = None, clean_view: bool = False,
          from_tune: Optional[Union[str, Path]] = None, precision: str = "fp32", against: str = "ce",
          strict: bool = False, main_features: bool = False) -> dict:
    """One sweep over ``methods`` (default: all) x ``grid`` x ``seeds``; optional files in out_dir.

    ``from_tune``: a ``tune`` results.json of this cache; each method runs at its chosen values
    (default methods: the tuned ones). ``cache`` may be a list of caches: each is checked and
    grouped into datasets first, then swept in turn, and the result is one multi-cache document
    (:mod:`ltcache.stage2.multi`; its paper table, against the method ``against``, is written
    to ``out_dir`` beside results.json). A grid key some methods lack is a notice (``strict``: an
    error). CE is added as the reference row when not asked for (``results["reference_added"]``).
    ``main_features``: every method on the cache's main features (default: a method whose source
    keeps BatchNorm in another mode trains on the cache's matching feature set, when it has one)."""
    if isinstance(cache, (list, tuple)) and len(cache) != 1:
        def one(c):
            return bench(c, methods, grid, seeds, select, test_views, device, quiet, preset, overrides, None, jobs,
                         clean_view, None, precision, strict=strict, main_features=main_features)
        return _bench_many(list(cache), methods, one, against, select, out_dir, quiet, from_tune)
    if isinstance(cache, (list, tuple)):
        cache = cache[0]
    dev = resolve_device(device)
    ck = check(_load_cache(cache, dev))                 # loaded and checked once; run_sweep trusts it
    cache = ck.cache
    picks = None
    if from_tune is not None:
        picks = load_choices(from_tune, cache)
        if grid:
            raise LtcacheError("--from-tune runs the tuned choices; it does not combine with --grid")
        methods = list(methods) if methods else list(picks)
        missing = [n for n in methods if get_method(n).name not in picks]
        if missing:
            raise LtcacheError(f"--from-tune {from_tune} has no choice for {', '.join(missing)}; drop them or tune them")
    names = list(methods) if methods else list(METHODS)
    if not names:
        raise LtcacheError("no methods given; use --all-methods or --methods a,b")
    for n in names:
        get_method(n)
    reference_added = "ce" not in [get_method(n).name for n in names]
    if reference_added:
        names = ["ce"] + names          # the CE re-train reference row (labelled under the table)
    pre = choose_preset(cache.num_classes, cache.feature_dim, preset)
    plans = _bench_plans(names, reference_added, picks, overrides, grid, pre, int(cache.splits["train"].labels.numel()),
                         strict)
    plans, skipped = _skip_val_choosers(ck.val_gap, plans, methods, select, quiet)
    plans, skipped = skip_stage1(ck, plans, skipped, methods, quiet)
    echo(run_header(cache, pre, dev, "bench"), quiet)
    results, _ = run_sweep(ck, plans, seeds, select, test_views, device, quiet, jobs, clean_view,
                           precision=precision, feature_sets=not main_features)
    results["preset"] = pre
    results["skipped"] = skipped
    results["reference_added"] = reference_added
    if out_dir is not None:
        from ltcache.stage2.results import write_all
        write_all(results, out_dir)
    return results


def _bench_many(caches: list, methods, one, against: str, select: str, out_dir, quiet: bool, from_tune) -> dict:
    """``bench`` over several caches (``one``: the sweep of one): one multi-cache document."""
    from ltcache.stage2 import multi
    if not caches:
        raise LtcacheError("no cache given; pass one or more caches")
    if from_tune is not None:
        raise LtcacheError("--from-tune holds the choices made on one cache; with several caches run "
                           "`ltcache tune` on them instead")
    names = [get_method(n).name for n in methods] if methods else list(METHODS)
    ref = multi.check_against(against, (["ce"] if "ce" not in names else []) + names)
    doc = multi.run_caches("bench", caches, one, ref, need_val="--select val" if select == "val" else None,
                           quiet=quiet)
    if out_dir is not None:
        multi.write_multi(doc, out_dir)
    return doc


def _bench_plans(names: list, reference_added: bool, picks: Optional[dict], overrides: Optional[dict],
                 grid: Optional[dict], pre: str, n_train: int, strict: bool) -> list:
    """The (method, params, overrides) of a bench: the grid over each method (the CE reference
    takes what applies to it, silently), or each method's tuned choice."""
    if picks is None:
        plans = expand(names[1:] if reference_added else names, overrides, grid, pre, n_train, strict)
        if reference_added:                                     # the reference takes what applies to it, silently
            plans = expand(["ce"], overrides, {k: v for k, v in (grid or {}).items() if k in GENERIC}, pre,
                           n_train) + plans
        return plans
    plans = []
    for n in names:
        m = get_method(n)
        ov = {**picks.get(m.name, {}), **{k: v for k, v in (overrides or {}).items()
                                           if k in m.tunables or (k in GENERIC and not m.closed_form)}}
        plans.append((m, resolve_params(m, pre, ov, n_train), ov))
    return plans


def _skip_val_choosers(gap: Optional[str], plans: list, methods, select: str, quiet: bool) -> tuple[list, list]:
    """Every method asked for (``methods`` None) on a val split that lacks classes (``gap``: why,
    :attr:`Checked.val_gap`): the methods that must choose on val are left out, said before
    training. (plans kept, skipped)."""
    skipped = []
    if methods is None and gap and select != "val":
        keep = [p for p in plans if needs_val([p], "last") is None]
        skipped = [{"name": run_name(m, p, ov), "method": m.name,
                    "why": f"chooses on the val split, but {gap}; give --tau or use a cache whose val covers every class"}
                   for m, p, ov in plans if needs_val([(m, p, ov)], "last") is not None]
        plans = keep
        for sk in skipped:
            echo(f"skipped {sk['name']}: {sk['why']}", quiet)
    return plans, skipped
