"""Public stage-2 entry points: ``retrain`` (one method) and ``bench`` (a sweep of methods).

Both take a loaded cache (``ltcache.cache.load(...)`` -> FeatureCache, or anything with the
same attributes) or a cache directory, build one :class:`~ltcache.stage2.sweep.Config` per
(method, grid point, seed), train all trainable ones in one batched sweep, compute the
closed-form ones, evaluate everything on the test split and return the results JSON dict
(ARCHITECTURE.md "Results JSON").
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ltcache.devices import resolve_device
from ltcache.errors import LtcacheError
from ltcache.metrics import accuracy_report, ece, full_report, nll
from ltcache.progress import echo
from ltcache.stage2 import closed_form as CF
from ltcache.stage2 import heads as H
from ltcache.stage2.losses import build_loss
from ltcache.stage2.methods import (GENERIC, METHODS, Method, check_param, choose_preset, get_method,
                                    resolve_params, run_name)
from ltcache.stage2.results import build_results
from ltcache.stage2.sweep import Config, TrainData, train_sweep

TEST_VIEWS = ("all", "center")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def _load_cache(cache, device):
    if isinstance(cache, (str, Path)) or cache is None:
        from ltcache import cache as cache_mod
        if not hasattr(cache_mod, "load") or not hasattr(cache_mod, "default_cache_path"):
            raise LtcacheError("this ltcache build cannot read feature caches yet (ltcache.cache.load is "
                               "missing); update ltcache")
        path = cache_mod.default_cache_path() if cache is None else Path(cache)
        return cache_mod.load(path, device=device)
    return cache


def parse_seeds(seeds: Union[str, Sequence[int]]) -> list[int]:
    """``"0,1,2"`` or a sequence -> list of distinct non-negative ints (LtcacheError if bad)."""
    if isinstance(seeds, str):
        parts = [s.strip() for s in seeds.split(",") if s.strip()]
        try:
            out = [int(s) for s in parts]
        except ValueError:
            raise LtcacheError(f"--seeds must be comma-separated integers like 0,1,2 (got '{seeds}')") from None
    else:
        out = [int(s) for s in seeds]
    if not out:
        raise LtcacheError("--seeds is empty; give at least one seed, e.g. --seeds 0")
    if any(s < 0 for s in out) or len(set(out)) != len(out):
        raise LtcacheError(f"--seeds must be distinct non-negative integers (got {out})")
    return out


def _view_names(split) -> list[str]:
    """A split's view names (empty for caches written from unnamed tensors)."""
    return list(getattr(split, "views", []) or [])


def _views(split, mode: str) -> torch.Tensor:
    """Features of the evaluation views: all (averaged later) or just 'center'."""
    if mode not in TEST_VIEWS:
        raise LtcacheError(f"unknown --test-views '{mode}'; use all or center")
    x = split.features
    if mode == "center":
        names = _view_names(split)
        i = names.index("center") if "center" in names else 0
        x = x[:, i:i + 1]
    return x


def _float(t, device):
    return t.to(device=device, dtype=torch.float32)


def train_view_pool(split, clean_view: bool) -> list[int]:
    """Which stored train views the epochs draw from. A cache with augmented views also holds the
    clean one; by default only the augmented views are drawn, as the papers' stage 2 always
    augments (``clean_view=True`` draws the clean view too)."""
    names = _view_names(split)
    n = int(split.features.shape[1])
    if clean_view or len(names) != n or names[:1] != ["clean"] or n < 2:
        return list(range(n))
    return list(range(1, n))


def _train_data(cache, device, test_views: str, clean_view: bool = False) -> TrainData:
    tr = cache.splits["train"]
    val = cache.splits.get("val")
    pool = train_view_pool(tr, clean_view)
    x = tr.features if len(pool) == tr.features.shape[1] else tr.features[:, pool]
    return TrainData(x=_float(x, device), labels=tr.labels.to(device).long(),
                     w0=_float(cache.weight, device), b0=_float(cache.bias, device),
                     val_x=_float(_views(val, test_views), device) if val is not None else None,
                     val_labels=val.labels.to(device).long() if val is not None else None)


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------

def expand(methods: Sequence[str], overrides: Optional[dict], grid: Optional[dict],
           preset: str, n_train: int) -> list[tuple[Method, dict, dict]]:
    """(method, full params, overrides) for every method x grid point.

    Grid keys that are generic apply to every trained method; a method's own key applies to
    the methods that have it; a key no chosen method has is an error.
    """
    grid = grid or {}
    for key, values in grid.items():
        if not values:
            raise LtcacheError(f"--grid {key}= has no values; give e.g. --grid {key}=0.9,0.98")
        if key not in GENERIC and not any(key in get_method(m).tunables for m in methods):
            raise LtcacheError(f"--grid {key} applies to none of the chosen methods; "
                               "check `ltcache methods` for each method's options")
        for v in values:
            check_param(key, v)
    plans = []
    for name in methods:
        method = get_method(name)
        keys = [k for k in grid if k in method.tunables or (k in GENERIC and not method.closed_form)]
        for combo in itertools.product(*[grid[k] for k in keys]):
            ov = {k: v for k, v in (overrides or {}).items()
                  if k in method.tunables or (k in GENERIC and not method.closed_form)}
            ov.update(dict(zip(keys, combo)))
            plans.append((method, resolve_params(method, preset, ov, n_train), ov))
    return plans


def make_config(method: Method, params: dict, seed: int, name: str, counts: torch.Tensor) -> Config:
    """The training :class:`Config` of one trained method with full params and a seed."""
    k = len(counts)
    return Config(name=name, method=method.name, params=params, seed=seed, head=method.head,
                  init=method.init, sampler=method.sampler,
                  loss=build_loss(method.loss, params, counts, scale=params.get("scale", 1.0)),
                  lr=params["lr"], wd=params["wd"], epochs=params["epochs"], batch_size=params["batch_size"],
                  momentum=params["momentum"], schedule=params["schedule"],
                  lr_factor=params.get("lr_factor", 1.0), maxnorm_thresh=params.get("maxnorm_thresh"),
                  scale=params.get("scale", 1.0),
                  bias_init=-math.log(k - 1) if method.sigmoid_bias and k > 1 else None)


def _closed_form_layer(method: Method, params: dict, cache, data: TrainData, counts) -> tuple[dict, dict]:
    w0, b0 = data.w0.cpu(), data.b0.cpu()
    extra = {}
    if method.head == "tau-norm":
        tau = params.get("tau")
        if tau is None:
            tau, curve = CF.select_tau(data.w0, data.val_x, data.val_labels)
            params["tau"] = tau
            extra["tau_curve"] = curve
        return CF.tau_norm_layer(w0, tau), extra
    if method.head == "posthoc-la":
        return CF.posthoc_la_layer(w0, b0, counts, params["tau"]), extra
    if method.head == "ncm":
        clean = _float(cache.splits["train"].features[:, 0], data.x.device)      # the clean (first) view
        return CF.ncm_layer(clean, data.labels, len(counts)), extra
    raise LtcacheError(f"method {method.name} has no closed form")


def layer_logits(layer: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits of a deployable layer on features x [N, V, D], averaged over the views."""
    if layer["kind"] == "linear":   # logits are linear in x: the view-mean features give the mean logits
        return H.apply_layer(layer, x.mean(1))
    # cosine and NCM normalise each view first: apply per view, then average
    return sum(H.apply_layer(layer, x[:, v]) for v in range(x.shape[1])) / x.shape[1]


def evaluate_layer(layer: dict, x: torch.Tensor, labels: torch.Tensor, counts) -> dict:
    """Metrics of a deployable layer on features x [N, V, D] (logits averaged over views)."""
    return full_report(layer_logits(layer, x).cpu(), labels.cpu(), counts, H.weight_norms(layer))


VAL_METRICS = ("all", "balanced", "many", "medium", "few", "nll", "ece")


def val_report(layer: dict, x: torch.Tensor, labels: torch.Tensor, counts) -> dict:
    """A run's val metrics (what selection may read): instance top-1 ``all``, class-balanced
    ``balanced`` (mean per-class accuracy), Many / Medium / Few, NLL and ECE (%)."""
    z = layer_logits(layer, x).cpu()
    y = labels.cpu()
    rep = accuracy_report(z, y, counts)
    return {"all": float((z.argmax(1) == y).double().mean() * 100), "balanced": rep["all"],
            "many": rep["many"], "medium": rep["medium"], "few": rep["few"],
            "nll": nll(z, y), "ece": ece(z, y)}


def val_gaps(cache) -> Optional[str]:
    """Why the cache's val split cannot back a val-based choice (None when it can): it is
    missing, empty, or lacks a class."""
    val = cache.splits.get("val")
    if val is None or int(val.labels.numel()) == 0:
        return "the cache has no val split"
    k = int(cache.num_classes)
    cnt = torch.bincount(val.labels.cpu().long(), minlength=k)
    missing = [i for i in range(k) if int(cnt[i]) == 0]
    if missing:
        names = list(getattr(cache, "class_names", None) or [str(i) for i in range(k)])
        shown = ", ".join(names[i] for i in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return f"its val split has no image of class {shown}"
    return None


def require_val(cache, why: str) -> None:
    """Refuse a val-based choice (``why``) on a val split that is missing or lacks a class."""
    gap = val_gaps(cache)
    if gap:
        raise LtcacheError(f"{why} chooses on the val split, but {gap}; use a cache whose val split covers every "
                           "class (stage 1 holds val out of the full training set since ltcache 0.2: re-run "
                           "`ltcache train` and `ltcache extract`)")


def needs_val(plans, select: str) -> Optional[str]:
    """What in a sweep chooses on val (None if nothing does)."""
    if select == "val":
        return "--select val"
    for method, params, _ in plans:
        if method.head == "tau-norm" and params.get("tau") is None:
            return "tau-norm (its tau)"
    return None


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

def run_sweep(cache, plans: list[tuple[Method, dict, dict]], seeds: Sequence[int], select: str = "last",
              test_views: str = "all", device: str = "auto", quiet: bool = False,
              jobs: Optional[int] = None, clean_view: bool = False, evaluate_test: bool = True) -> tuple[dict, list]:
    """Train/compute every plan x seed; returns (results dict, [(run dict, layer)]).

    Every run records its val metrics (``run["val"]``, when the cache has a val split) beside
    its test metrics. ``evaluate_test=False`` never reads the test split (selection sweeps).
    ``jobs``: worker processes for CPU sweeps of small heads (None: the cores torch may use; 1: none).
    ``clean_view``: also draw the clean train view (default: augmented views only, when present)."""
    if jobs is not None and jobs < 1:
        raise LtcacheError(f"--jobs must be >= 1 (got {jobs}); 1 trains everything in this process")
    if select not in ("last", "val"):
        raise LtcacheError(f"unknown --select '{select}'; use last or val")
    dev = resolve_device(device)
    cache = _load_cache(cache, dev)
    seeds = parse_seeds(seeds)
    why = needs_val(plans, select)
    if why:
        require_val(cache, why)                         # before anything trains
    if evaluate_test and "test" not in cache.splits:
        raise LtcacheError("the cache has no test split; re-extract it with the test split")
    t0 = time.perf_counter()
    data = _train_data(cache, dev, test_views, clean_view)
    counts = torch.as_tensor(cache.class_counts).long().cpu()
    clist = counts.tolist()
    if evaluate_test:
        test = cache.splits["test"]
        test_x, test_y = _float(_views(test, test_views), dev), test.labels.to(dev).long()
    has_val = data.val_x is not None and data.val_x.shape[0] > 0

    def evaluate(layer):
        """(test metrics or None, val metrics or None) of one layer."""
        return (evaluate_layer(layer, test_x, test_y, clist) if evaluate_test else None,
                val_report(layer, data.val_x, data.val_labels, clist) if has_val else None)

    configs, entries = [], []
    for method, params, ov in plans:
        name = run_name(method, params, ov)
        for seed in seeds:
            if method.closed_form:
                entries.append(("closed", method, dict(params), ov, seed, name))
            else:
                entries.append(("train", len(configs), None, None, seed, name))
                configs.append(make_config(method, params, seed, name, counts))
    trained = train_sweep(configs, data, select=select, quiet=quiet, n_jobs=jobs) if configs else []

    runs, layers = [], []
    closed = {}          # closed forms do not depend on the seed: compute and evaluate each once
    for kind, a, params, ov, seed, name in entries:
        extra = {}
        if kind == "train":
            head = trained[a]
            method, layer, params, sel = get_method(head.config.method), head.layer, head.config.params, head.selected_epoch
            metrics, val = evaluate(layer)
        else:
            method, sel = a, None
            key = (method.name, repr(sorted(params.items())))
            if key not in closed:
                layer, extra = _closed_form_layer(method, params, cache, data, counts)   # sets a chosen tau
                closed[key] = (layer, extra, dict(params), *evaluate(layer))
            layer, extra, chosen, metrics, val = closed[key]
            metrics, val = copy.deepcopy(metrics), copy.deepcopy(val)
            params = dict(chosen)
        run = {"name": name, "method": method.name, "params": dict(params), "seed": seed,
               "selected_epoch": sel, "metrics": metrics, "val": val}
        run.update(extra)
        runs.append(run)
        layers.append(layer)
    stage1_layer = {"kind": "linear", "weight": data.w0, "bias": data.b0}
    stage1, stage1_val = evaluate(stage1_layer)
    wall = time.perf_counter() - t0
    results = build_results(cache, runs, stage1, wall, str(dev))
    results["stage1_val"] = stage1_val
    tr = cache.splits["train"]
    names = _view_names(tr)
    results["train_views"] = [names[i] if i < len(names) else str(i) for i in train_view_pool(tr, clean_view)]
    echo(f"sweep: {len(runs)} runs ({len(configs)} trained) in {wall:.1f} s on {dev}", quiet)
    return results, list(zip(runs, layers))


def retrain(cache, method: str, overrides: Optional[dict] = None, seeds: Sequence[int] = (0,),
            select: str = "last", test_views: str = "all", device: str = "auto", quiet: bool = False,
            preset: Optional[str] = None, export: Optional[Union[str, Path]] = None,
            jobs: Optional[int] = None, clean_view: bool = False,
            from_tune: Optional[Union[str, Path]] = None) -> dict:
    """Re-train one method (with ``overrides`` of its hyper-parameters) for each seed.

    Returns the results JSON dict. ``export`` writes the first seed's head with the stage-1
    backbone as a deployable model (see :func:`ltcache.export.export_model`). ``from_tune``: a
    ``tune`` results.json of this cache; its choice for the method, under any ``overrides``.
    """
    if export is not None and len(parse_seeds(seeds)) != 1:
        raise LtcacheError(f"export writes one model but {len(parse_seeds(seeds))} seeds were given; "
                           "pass one seed with --export (e.g. --seeds 0)")
    dev = resolve_device(device)
    cache = _load_cache(cache, dev)
    m = get_method(method)
    if from_tune is not None:
        from ltcache.stage2.tune import load_choices
        picks = load_choices(from_tune, cache)
        if m.name not in picks:
            raise LtcacheError(f"--from-tune {from_tune} has no choice for {m.name} (it tuned "
                               f"{', '.join(picks)}); drop --from-tune or tune {m.name}")
        overrides = {**picks[m.name], **(overrides or {})}
    pre = choose_preset(cache.num_classes, cache.feature_dim, preset)
    plans = expand([m.name], overrides, None, pre, int(cache.splits["train"].labels.numel()))
    results, pairs = run_sweep(cache, plans, seeds, select, test_views, device, quiet, jobs, clean_view)
    results["preset"] = pre
    if export is not None:
        from ltcache.export import export_model
        export_model(cache, pairs[0][1], export, meta={"method": m.name, "params": pairs[0][0]["params"]})
    return results


def bench(cache, methods: Optional[Sequence[str]] = None, grid: Optional[dict] = None,
          seeds: Sequence[int] = (0,), select: str = "last", test_views: str = "all",
          device: str = "auto", quiet: bool = False, preset: Optional[str] = None,
          overrides: Optional[dict] = None, out_dir: Optional[Union[str, Path]] = None,
          jobs: Optional[int] = None, clean_view: bool = False,
          from_tune: Optional[Union[str, Path]] = None) -> dict:
    """One sweep over ``methods`` (default: all) x ``grid`` x ``seeds``; optional files in out_dir.

    ``from_tune``: a ``tune`` results.json of this cache; each method runs at its chosen values
    (default methods: the tuned ones)."""
    dev = resolve_device(device)
    cache = _load_cache(cache, dev)
    picks = None
    if from_tune is not None:
        from ltcache.stage2.tune import load_choices
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
    if "ce" not in names:
        names = ["ce"] + names          # the CE re-train reference row
    pre = choose_preset(cache.num_classes, cache.feature_dim, preset)
    n_train = int(cache.splits["train"].labels.numel())
    if picks is None:
        plans = expand(names, overrides, grid, pre, n_train)
    else:
        plans = []
        for n in names:
            m = get_method(n)
            ov = {**picks.get(m.name, {}), **{k: v for k, v in (overrides or {}).items()
                                               if k in m.tunables or (k in GENERIC and not m.closed_form)}}
            plans.append((m, resolve_params(m, pre, ov, n_train), ov))
    skipped = []
    gap = val_gaps(cache)
    if methods is None and gap and select != "val":
        # every method was asked for: one that must choose on val is left out, said before training
        keep = [p for p in plans if needs_val([p], "last") is None]
        skipped = [{"name": run_name(m, p, ov), "method": m.name,
                    "why": f"chooses on the val split, but {gap}; give --tau or use a cache whose val covers every class"}
                   for m, p, ov in plans if needs_val([(m, p, ov)], "last") is not None]
        plans = keep
        for sk in skipped:
            echo(f"skipped {sk['name']}: {sk['why']}", quiet)
    results, _ = run_sweep(cache, plans, seeds, select, test_views, device, quiet, jobs, clean_view)
    results["preset"] = pre
    results["skipped"] = skipped
    if out_dir is not None:
        from ltcache.stage2.results import write_all
        write_all(results, out_dir)
    return results


from ltcache.stage2.tune import tune  # noqa: E402,F401  (public here: ltcache.stage2.api.tune)
