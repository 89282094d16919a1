"""Step 1 of a stage-2 sweep: what it runs on and what it runs.

A sweep goes one way through five modules:

1. ``plan.py`` (this one): the cache's training data (:class:`TrainData`: the train views the
   epochs draw from, the val views) and the plan: every method x grid point
   (:func:`expand`) x seed, as a training :class:`Config` (:func:`make_config`) or a closed form
   (:func:`plan_runs`);
2. ``grouping.py``: configurations grouped by head family, frozen base and batch size
   (``sweep.py`` drives steps 2 and 3; ``workers.py``, the scheduler, places the groups in
   processes on a CPU or across torchrun ranks);
3. ``group.py`` (engine; ``epochs.py``, ``sgd.py``, ``selection.py``): each group trained as
   one stacked computation;
4. ``evaluate.py``: every trained head and closed form evaluated on test and val;
5. ``results.py``: the results document.

``runner.run_sweep`` (behind ``api.retrain``, ``api.bench`` and ``tune``) calls them in
that order.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from ltcache.errors import LtcacheError
from ltcache.options import TEST_VIEWS
from ltcache.stage2.closed_form import POSTHOC
from ltcache.stage2.heads import HeadKind, get_head
from ltcache.stage2.losses import LossSpec, build_loss
from ltcache.stage2.methods import GENERIC, Method, check_param, get_method, resolve_params, run_name, split_key
from ltcache.stage2.params import SCHEDULES
from ltcache.stage2.samplers import ClassIndex


# ---------------------------------------------------------------------------------------------
# what a sweep runs: configurations
# ---------------------------------------------------------------------------------------------

@dataclass
class Config:
    """One stage-2 training configuration (a method with its hyper-parameters and a seed)."""

    name: str
    method: str
    params: dict
    seed: int
    head: str
    init: str
    sampler: str
    loss: LossSpec
    lr: float
    wd: float
    epochs: int
    batch_size: int
    momentum: float = 0.9
    schedule: str = "cosine"
    lr_factor: float = 1.0
    maxnorm_thresh: Optional[float] = None
    scale: float = 1.0
    bias_init: Optional[float] = None
    steps: str = ""            # batches per epoch: floor | ceil | ceil+1 ("" = the sampler's default; samplers.py)
    no_wd: tuple = ()          # parameters trained without weight decay (e.g. ("b",): the CB repo's bias)

    @cached_property
    def kind(self) -> HeadKind:
        """The head's :class:`~ltcache.stage2.heads.HeadKind`, looked up once (on first use: after
        the plugins are loaded and checked) and kept as an attribute; not pickled (a worker's
        copy looks it up again)."""
        return get_head(self.head)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "kind"}

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch`` under this configuration's schedule (the schedules:
        :mod:`ltcache.stage2.sweep`)."""
        if self.schedule == "constant":
            return self.lr
        t = epoch + (1 if self.schedule == "cosine-start" else 0)
        if self.schedule not in SCHEDULES:
            raise LtcacheError(f"unknown schedule '{self.schedule}'; use {', '.join(SCHEDULES)}")
        return 0.5 * self.lr * (1 + math.cos(math.pi * t / self.epochs))


def expand(methods: Sequence[str], overrides: Optional[dict], grid: Optional[dict],
           preset: str, n_train: int, strict: bool = False, notice: bool = True) -> list[tuple[Method, dict, dict]]:
    """(method, full params, overrides) for every method x grid point.

    A key is a short name (``tau``) or qualified by its method (``la-loss.tau``). A short key that
    is generic applies to every trained method; a method's own short key applies to each method
    that has it, as that method's own hyper-parameter (``tau`` is la-loss's offset and vs's
    additive tau); a short key no chosen method has is an error, one some chosen methods lack a
    notice naming them (an error with ``strict``). A qualified key applies to its method only and
    wins over the short key of the same name; its method must be in the run and have it.
    """
    grid, overrides = grid or {}, overrides or {}
    chosen = [get_method(m) for m in methods]
    by_name = {m.name: m for m in chosen}
    _check_grid(grid, chosen, by_name, strict, notice)
    q_over = {key: _qualified(key, "override", by_name) for key in overrides}
    plans = []
    for method in chosen:
        ov, mgrid = _method_grid(method, overrides, q_over, grid, by_name)
        keys = list(mgrid)
        for combo in itertools.product(*[mgrid[k] for k in keys]):
            point = dict(ov)
            point.update(dict(zip(keys, combo)))
            plans.append((method, resolve_params(method, preset, point, n_train), point))
    return plans


def _has(method: Method, name: str) -> bool:
    """Whether ``name`` is one of ``method``'s hyper-parameters (its own or a generic one)."""
    return name in method.tunables or (name in GENERIC and not method.closed_form)


def _qualified(key: str, flag: str, by_name: dict) -> Optional[tuple[str, str]]:
    """(method, param) of a qualified key (checked against the run's methods); None for a short key."""
    mname, name = split_key(key)
    if not mname:
        return None
    m = by_name.get(mname) or by_name.get(get_method(mname).name)
    if m is None:
        raise LtcacheError(f"{flag} {key}: method {mname} is not in this run ({', '.join(by_name)}); "
                           f"add it to the methods or drop {key}")
    if not _has(m, name):
        own = ", ".join(sorted(set(m.tunables) | (set() if m.closed_form else set(GENERIC)))) or "none"
        raise LtcacheError(f"{flag} {key}: method {m.name} has no hyper-parameter {name} (its: {own})")
    return m.name, name


def _check_grid(grid: dict, chosen: list, by_name: dict, strict: bool, notice: bool) -> None:
    """Every grid key and value checked before any work; a short key some methods lack is a notice
    (an error with ``strict``)."""
    for key, values in grid.items():
        if not values:
            raise LtcacheError(f"--grid {key}= has no values; give e.g. --grid {key}=0.9,0.98")
        q = _qualified(key, "--grid", by_name)
        if q is not None:
            for v in values:
                check_param(q[1], v, q[0])
            continue
        if key not in GENERIC and not any(key in m.tunables for m in chosen):
            raise LtcacheError(f"--grid {key} applies to none of the chosen methods; "
                               "check `ltcache methods` for each method's options")
        for v in values:
            check_param(key, v)
        lack = [m.name for m in chosen if not _has(m, key)]
        if lack:
            msg = f"--grid {key} does not apply to {', '.join(lack)}"
            if strict:
                raise LtcacheError(f"{msg}; drop them from --methods or drop --strict to run them without it")
            from ltcache.progress import echo
            echo(f"notice: {msg}; they run once, without it (--strict makes this an error)", not notice)


def _method_grid(method: Method, overrides: dict, q_over: dict, grid: dict, by_name: dict) -> tuple[dict, dict]:
    """(the overrides, the grid) that apply to ``method``: its short keys, then its qualified ones over them."""
    ov = {k: v for k, v in overrides.items() if q_over[k] is None and _has(method, k)}
    mgrid = {k: vals for k, vals in grid.items() if "." not in k and _has(method, k)}
    for key, v in overrides.items():              # a qualified override: this method's, over the short ones
        if q_over[key] is not None and q_over[key][0] == method.name:
            ov[q_over[key][1]] = v
            mgrid.pop(q_over[key][1], None)
    for key, vals in grid.items():
        mname, name = split_key(key)
        if mname and by_name.get(mname, get_method(mname)).name == method.name:
            mgrid[name] = vals
    return ov, mgrid


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
                  bias_init=-math.log(k - 1) if method.sigmoid_bias and k > 1 else None,
                  steps=getattr(method, "steps", ""), no_wd=tuple(getattr(method, "no_wd", ())))


class Entry(NamedTuple):
    """One run of a sweep, in the order of the results: a trained configuration (``config`` is
    its index in :attr:`RunPlan.configs`) or a closed form (``config`` None; ``params`` its own
    copy, where a tau chosen on val is written)."""

    method: Method
    params: dict
    overrides: dict
    seed: int
    name: str
    config: Optional[int]


class RunPlan(NamedTuple):
    """Every run of a sweep (:class:`Entry`, plan x seed) and the configurations to train."""

    entries: list
    configs: list


def plan_runs(plans: Sequence[tuple[Method, dict, dict]], seeds: Sequence[int], counts: torch.Tensor) -> RunPlan:
    """Plans x seeds as runs: one :class:`Config` per trained method and seed (sharing the
    plan's params), a closed form once per seed (evaluated once: it does not depend on it)."""
    configs: list[Config] = []
    entries: list[Entry] = []
    for method, params, ov in plans:
        name = run_name(method, params, ov)
        for seed in seeds:
            if method.closed_form:
                entries.append(Entry(method, dict(params), ov, seed, name, None))
            else:
                entries.append(Entry(method, params, ov, seed, name, len(configs)))
                configs.append(make_config(method, params, seed, name, counts))
    return RunPlan(entries, configs)


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


def needs_val(plans, select: str) -> Optional[str]:
    """What in a sweep chooses on val (None if nothing does)."""
    if select == "val":
        return "--select val"
    for method, params, _ in plans:
        if method.head == "tau-norm" and params.get("tau") is None:
            return "tau-norm (its tau)"
        if method.closed_form and POSTHOC.get(method.head).needs_val:
            return f"method {method.name} (post-hoc rule '{method.head}', {POSTHOC.origin(method.head)})"
    return None


# ---------------------------------------------------------------------------------------------
# what a sweep runs on: the cache's tensors
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """What training needs from a cache, already on the compute device."""

    x: torch.Tensor                   # train features [N, V, D]
    labels: torch.Tensor              # [N] long (device)
    w0: torch.Tensor                  # stage-1 weight [K, D]
    b0: torch.Tensor                  # stage-1 bias [K]
    class_index: ClassIndex = None    # CPU
    val_x: Optional[torch.Tensor] = None   # val features [Nv, V', D] (views used for selection)
    val_labels: Optional[torch.Tensor] = None
    # Optional feature source replacing the cached gather: gather(rows [M*B], valid [M*B]) ->
    # features [M*B, D]. The reference "through the backbone" path plugs the frozen backbone in
    # here, so both paths share the samplers, losses and optimiser step.
    gather: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    # the arithmetic of the training GEMMs (:mod:`ltcache.stage2.precision`): fp32, bf16 or tf32
    precision: str = "fp32"

    def __post_init__(self):
        if self.class_index is None:
            self.class_index = ClassIndex.from_labels(self.labels.cpu(), self.w0.shape[0])


def _load_cache(cache, device):
    """A loaded cache: ``cache`` itself, or the cache at a path (None: the bundled one)."""
    if isinstance(cache, (str, Path)) or cache is None:
        from ltcache import cache as cache_mod
        path = cache_mod.default_cache_path() if cache is None else Path(cache)
        return cache_mod.load(path, device=device)
    return cache


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


def eval_split(split, device, test_views: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An evaluated split's features [N, V, D] (its ``test_views``) and labels on ``device``."""
    return _float(_views(split, test_views), device), split.labels.to(device).long()


def train_view_pool(split, clean_view: bool) -> list[int]:
    """Which stored train views the epochs draw from. A cache with augmented views also holds the
    clean one; by default only the augmented views are drawn, as the papers' stage 2 always
    augments (``clean_view=True`` draws the clean view too)."""
    names = _view_names(split)
    n = int(split.features.shape[1])
    if clean_view or len(names) != n or names[:1] != ["clean"] or n < 2:
        return list(range(n))
    return list(range(1, n))


def train_view_names(split, clean_view: bool) -> list[str]:
    """The names of the views of :func:`train_view_pool` (their index for an unnamed view)."""
    names = _view_names(split)
    return [names[i] if i < len(names) else str(i) for i in train_view_pool(split, clean_view)]


def _train_data(cache, device, test_views: str, clean_view: bool = False, precision: str = "fp32") -> TrainData:
    """The cache's :class:`TrainData`: the pooled train views, the stage-1 layer, the val views."""
    tr = cache.splits["train"]
    val = cache.splits.get("val")
    pool = train_view_pool(tr, clean_view)
    x = tr.features if len(pool) == tr.features.shape[1] else tr.features[:, pool]
    val_x, val_labels = eval_split(val, device, test_views) if val is not None else (None, None)
    return TrainData(x=_float(x, device), labels=tr.labels.to(device).long(),
                     w0=_float(cache.weight, device), b0=_float(cache.bias, device),
                     val_x=val_x, val_labels=val_labels, precision=precision)


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
