"""Steps 2 and 3 of a stage-2 sweep (see :mod:`ltcache.stage2.plan`): configurations in
groups, each group trained as one computation of M stacked heads.

Configurations that share a head family, a batch size and whether the stage-1 layer stays
frozen (:func:`group_key`) form a group. Their parameters are stacked ([M, K, D] ...). Per
epoch, every configuration draws its own index batches (its sampler, its view per sample,
its ``torch.Generator`` seeded by its seed) as one tensor [M, S, B]; a configuration with
fewer steps or epochs than the group is padded with invalid samples and inactive steps (no
update, no momentum decay). Per step there is one gather, one batched matmul, the analytic
gradient of the vectorised loss of all M configurations (per-configuration hyper-parameters
as tensors; no autograd graph), one bmm for the weight gradient and one hand-written batched
SGD-momentum update (members whose loss is given only as a forward get their loss gradient by
autograd, :mod:`ltcache.stage2.losses._fallback`, placed into the group's). Heads that train
only an affine correction of the frozen stage-1 layer (LWS, MARC) gather precomputed base
logits instead of features. Members that read the same rows (same sampler, seed and epochs:
e.g. every instance-balanced method of one seed) sit in
blocks that share one gather and one wider GEMM (:func:`stream_blocks`); the loss still sees
the members in the caller's order. Python loops run over epochs, steps and parameter names,
never over configurations inside a step.

Reading order: :func:`train_sweep` (groups by :func:`make_groups`, in this process or in
workers) -> :func:`train_group`, which drives a :class:`GroupTrainer`: its initialisation
stacks the members' parameters; :meth:`~GroupTrainer.prepare_epoch` makes an epoch's index
batches and per-step factors; :meth:`~GroupTrainer.step` is features -> forward
(:func:`heads.forward_train`) -> loss gradient -> backward (:func:`heads.backward`) -> update;
:meth:`~GroupTrainer.end_epoch` projects (MaxNorm) and selects on val;
:meth:`~GroupTrainer.collect` gives each member's deployable layer.

Where the time goes: on a GPU or with large shapes (D 512+) the two bmm per step dominate,
with the element-wise loss work next (about a third of a D 512 step on a CPU). On a CPU with
small shapes (CIFAR-10, D 64) a step costs mostly per-op overhead, so the engine prepares each
epoch's indices and loss targets ahead on a thread and, on several cores, trains whole groups
side by side in forked single-thread worker processes (``n_jobs``, see
:mod:`ltcache.stage2.workers`; also used up to D 1024).

Optimiser: PyTorch SGD semantics (dampening 0, no Nesterov): g += wd * p; buf = mu * buf + g
(buf = g on the first step); p -= lr * buf; wd is 0 on a member's ``no_wd`` parameters.
Batches per epoch: the member's sampler cut by its step rule (:mod:`ltcache.stage2.samplers`).

Learning-rate schedules, per epoch (each method's preset picks the one its script uses):
* ``cosine``       lr_e = lr/2 (1 + cos(pi e / E)), e = 0..E-1 -- LOS (CosineAnnealingLR
                   stepped after each epoch) and MiSLAS (explicit formula).
* ``cosine-start`` lr_e = lr/2 (1 + cos(pi (e+1) / E)) -- cRT, BALMS, BagofTricks and LTWB
                   call ``scheduler.step()`` at the start of each epoch under PyTorch >= 1.1,
                   so the last epoch has lr 0.
* ``constant``     lr_e = lr.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Callable, Iterator, Optional, Sequence

import torch

from ltcache import distributed as _dist
from ltcache.errors import LtcacheError
from ltcache.metrics import class_mean_accuracy
from ltcache.progress import progress
from ltcache.stage2 import heads as H
from ltcache.stage2.losses import LossTargets, batched_loss_grad, get_loss, loss_signature, loss_targets, stack_specs
from ltcache.stage2.losses._fallback import AutogradLossGrad
from ltcache.stage2.params import SCHEDULES  # noqa: F401  (re-exported)
from ltcache.stage2.plan import Config, TrainData  # noqa: F401  (re-exported: sweep.Config, sweep.TrainData)
from ltcache.stage2.precision import feature_dtype, matmul_mode
from ltcache.stage2.samplers import DEFAULT_STEPS, ClassIndex, epoch_indices, epoch_samples, steps_per_epoch
from ltcache.stage2.workers import in_worker, run_in_workers, worth_workers

EVAL_CHUNK = 1 << 25     # elements of a [m, N, K] logits block at evaluation


@dataclass
class TrainedHead:
    """A trained configuration: its deployable layer (CPU) and the epoch kept."""

    config: Config
    layer: dict
    selected_epoch: int
    history: list = field(default_factory=list)
    failed: Optional[str] = None          # why the configuration failed (non-finite parameters), or None


# ---------------------------------------------------------------------------------------------
# step 2: groups
# ---------------------------------------------------------------------------------------------

def frozen_base(cfg: Config) -> bool:
    """True for heads that train only the affine s, c on the frozen stage-1 layer (LWS, MARC):
    their base logits x W^T + b never change, so the engine computes them once per cache row."""
    kind = H.get_head(cfg.head)
    return (kind.family == "affine" and cfg.init == "stage1" and cfg.bias_init is None
            and not {"W", "b"} & set(kind.trained) and not reads_batch(cfg))


def reads_batch(cfg: Config) -> tuple:
    """What a member's loss reads beyond the logits: ("h",) the features, ("head",) its head's
    parameters (a plugin loss; such members get features, not frozen base logits)."""
    return get_loss(cfg.loss.user).reads if cfg.loss.user is not None else ()


def group_key(cfg: Config) -> tuple:
    """Configurations with equal keys are trained as one stacked group."""
    return (H.get_head(cfg.head).family, frozen_base(cfg), cfg.batch_size)


def make_groups(configs: Sequence[Config]) -> list[list[int]]:
    """The indices of ``configs`` in groups (:func:`group_key`); inside a group, members needing
    the same optional loss terms side by side (each term then runs on one slice)."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(group_key(c), []).append(i)

    def order(i: int) -> tuple:
        return loss_signature(configs[i].loss), "s" in H.get_head(configs[i].head).trained

    return [sorted(members, key=order) for members in groups.values()]


def train_sweep(configs: Sequence[Config], data: TrainData, select: str = "last",
                quiet: bool = False, n_jobs: Optional[int] = None) -> list[TrainedHead]:
    """Train every configuration; groups by :func:`group_key`; results in input order.

    ``n_jobs``: worker processes for CPU sweeps of small heads (D <= 1024 or tiny steps;
    default: the cores torch may use)."""
    if select not in ("last", "val"):
        raise LtcacheError(f"unknown --select '{select}'; use last or val")
    if select == "val" and data.val_x is None:
        raise LtcacheError("--select val needs a val split in the cache; use --select last "
                           "or extract the cache with a val split")
    low = feature_dtype(data.precision)
    if low != torch.float32 and data.x.dtype != low and data.gather is None:
        data = replace(data, x=data.x.to(low))        # bf16 features: cast once, before any fork
    with matmul_mode(data.precision):
        if _dist.init_from_env(data.x.device):
            return _train_across_ranks(configs, data, select, quiet, n_jobs)
        return _train_here(configs, data, select, quiet, n_jobs)


def _train_here(configs: Sequence[Config], data: TrainData, select: str, quiet: bool,
                n_jobs: Optional[int]) -> list[TrainedHead]:
    """:func:`train_sweep` in this process (and its forked workers)."""
    plan = make_groups(configs)
    out: list[Optional[TrainedHead]] = [None] * len(configs)
    jobs = min(n_jobs or os.cpu_count() or 1, torch.get_num_threads())
    if not worth_workers(plan, configs, data, jobs):
        for members in plan:
            for i, t in zip(members, train_group([configs[i] for i in members], data, select=select, quiet=quiet)):
                out[i] = t
        return out  # type: ignore[return-value]
    # Small steps on a CPU are bound by per-op (Python) overhead, which OpenMP threads inside
    # each op do not shorten, and mid-size ones (D <= 1024) by element-wise work that spreads
    # better over processes: train whole groups side by side in worker processes.
    for i, t in run_in_workers(train_group, plan, configs, data, select, quiet, jobs):
        out[i] = t
    return out  # type: ignore[return-value]


def _train_across_ranks(configs: Sequence[Config], data: TrainData, select: str, quiet: bool,
                        n_jobs: Optional[int]) -> list[TrainedHead]:
    """torchrun (:mod:`ltcache.distributed`): the same plan checked on every rank, its groups
    split (balanced as the workers' parts are) across the ranks, each rank's share trained here,
    the heads all-gathered: every rank returns every configuration's head, in input order."""
    from ltcache.stage2.workers import _balance, _work
    keys = [(c.name, c.method, c.seed, sorted(c.params.items()), c.head, c.init, c.sampler, c.lr, c.wd,
             c.epochs, c.batch_size, c.momentum, c.schedule, c.lr_factor, c.maxnorm_thresh, c.scale,
             c.bias_init, c.steps, c.no_wd) for c in configs]
    _dist.check_same((keys, select, tuple(data.x.shape), tuple(data.w0.shape)), "sweep")
    n, me = _dist.world(), _dist.rank()
    parts = _balance(make_groups(configs), configs, data, n)       # costliest first
    while len(parts) < n and max(len(p) for p in parts) >= 2:     # every rank gets work while it can
        top = max(parts, key=len)
        parts.remove(top)
        parts += [top[:len(top) // 2], top[len(top) // 2:]]
    parts.sort(key=lambda p: -_work(configs, p, data))
    if os.environ.get("LTCACHE_DIST_DEBUG"):
        print(f"rank {me}: parts {parts}", file=sys.stderr, flush=True)
    load, mine = [0.0] * n, []
    for part in parts:                                              # each part to the least-loaded rank
        r = min(range(n), key=lambda q: (load[q], q))
        load[r] += _work(configs, part, data)
        if r == me:
            mine.extend(part)
    mine.sort()
    trained = _train_here([configs[i] for i in mine], data, select, quiet, n_jobs) if mine else []
    _dist.barrier("the sweep")                                     # gloo: names a rank that died training
    out: list[Optional[TrainedHead]] = [None] * len(configs)
    for idx, heads in _dist.all_gather_objects((mine, trained), what="the gather of the trained heads"):
        for i, t in zip(idx, heads):
            out[i] = t
    return out  # type: ignore[return-value]


def stream_key(c: Config) -> tuple:
    """What a configuration's batches depend on besides its group's batch size and views: its
    sampler, seed, epochs and whether its head's initialisation draws from the same generator
    first (a fresh or cosine head draws its weights). Members with equal keys read the same
    rows at every step."""
    draws = H.get_head(c.head).family != "affine" or c.init == "fresh"
    return (c.sampler, int(c.seed), c.epochs, draws, c.steps or DEFAULT_STEPS.get(c.sampler, ""))


def stream_blocks(cfgs: Sequence[Config]) -> tuple[list[int], int, int]:
    """A member order with the members that read identical rows (:func:`stream_key`) in
    blocks: (order, S, r).

    Blocks hold r members (the r that puts the most members in blocks; the larger on ties);
    the S blocks come first in ``order``, then the other members in their given order. S = 0
    when no two members share a stream. The engine still checks, each epoch, that every
    block's rows are equal, and gathers per member if they are not."""
    streams: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        streams.setdefault(stream_key(c), []).append(i)
    sizes = {len(v) for v in streams.values() if len(v) >= 2}
    if not sizes:
        return list(range(len(cfgs))), 0, 1
    r = max(sizes, key=lambda r: (sum(len(v) // r * r for v in streams.values()), r))
    blocks = [v[j * r:(j + 1) * r] for v in streams.values() for j in range(len(v) // r)]
    inside = {i for b in blocks for i in b}
    return [i for b in blocks for i in b] + [i for i in range(len(cfgs)) if i not in inside], len(blocks), r


# ---------------------------------------------------------------------------------------------
# step 3: one group trained as one stacked computation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def train_group(cfgs: Sequence[Config], data: TrainData, select: str = "last",
                quiet: bool = False, bar_position: int = 0) -> list[TrainedHead]:
    """Train M configurations of one group (same :func:`group_key`) together."""
    group = GroupTrainer(cfgs, data, select)                 # the stacked parameters, initialised
    label = "frozen-base " if group.base else ""
    bar = progress(total=group.total_steps, desc=f"train {label}{group.family} B={group.bsz} x{group.m}",
                   quiet=quiet, unit="step", position=bar_position)
    try:
        with _prepared_ahead(group.prepare_epoch, group.epochs, group.dev) as epochs:
            for e, ep in epochs:
                for s in range(ep.s_max):
                    group.step(ep, s)               # features -> forward -> loss grad -> backward -> update
                bar.update(ep.s_max)
                group.end_epoch(e)                  # MaxNorm projection, val selection
    finally:
        bar.close()
    return group.collect()


@contextmanager
def _prepared_ahead(prepare: Callable[[int], "Epoch"], epochs: int, dev: torch.device) -> Iterator:
    """(e, prepare(e)) for every epoch; each epoch prepared on a thread while the previous one
    trains when this process runs ops on one thread (or a GPU): beside multi-threaded CPU ops it
    would only compete for the same cores."""
    pool = (ThreadPoolExecutor(max_workers=1)
            if dev.type == "cuda" or (not in_worker() and torch.get_num_threads() == 1) else None)

    def stream():
        upcoming = pool.submit(prepare, 0) if pool else None
        for e in range(epochs):
            ep = upcoming.result() if pool else prepare(e)
            if pool and e + 1 < epochs:
                upcoming = pool.submit(prepare, e + 1)
            yield e, ep

    try:
        yield stream()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


@dataclass
class Epoch:
    """Everything one epoch's steps read, made ahead: per step (tuples of views, one per step)
    the gathered rows, loss targets and the update's per-member factors."""

    s_max: int                 # steps (the longest member's)
    rows: tuple                # flat cache rows [M*B] (param order)
    valid: tuple               # [M*B] bool, CPU
    shared: Optional[tuple]    # (rows of the blocks' first members, rows of the rest) or None
    targets: list              # LossTargets of the built-in losses (loss order)
    user: Optional[SimpleNamespace]   # labels / valid / counts of the forward-only losses
    paused: list               # a step where some member pauses mid-run (needs the masked update)
    c_mom: dict                # momentum factor: mu for an active member, 1 for an inactive one
    act: dict                  # 1 for an active member, 0 otherwise
    neg_lr: dict               # -lr x the parameter's lr factor for an active member, 0 otherwise


class GroupTrainer:
    """The state of M configurations of one group trained together.

    Parameters live in "param order" (members reading the same rows in blocks, see
    :func:`stream_blocks`); the loss sees the caller's order (its optional terms on contiguous
    slices), members with a forward-only loss (autograd fallback) moved after the ``nb``
    built-in ones. :meth:`prepare_epoch` makes an epoch's batches, :meth:`step` trains one
    step, :meth:`end_epoch` projects and selects, :meth:`collect` gives the trained heads."""

    def __init__(self, cfgs: Sequence[Config], data: TrainData, select: str = "last"):
        key = group_key(cfgs[0])
        if any(group_key(c) != key for c in cfgs):
            raise ValueError("train_group needs configurations of one group_key (head family, frozen base, batch size)")
        self.family, self.base, self.bsz = key
        self.data, self.select = data, select
        self.dev, self.m = data.x.device, len(cfgs)
        self.n, self.n_views, self.d = data.x.shape
        self.k = data.w0.shape[0]
        self._order_members(cfgs)
        self._init_params()
        self._init_optimiser()
        self._init_losses()
        self._init_inputs()
        self._init_selection()

    # -- initialisation -----------------------------------------------------------------------

    def _order_members(self, cfgs: Sequence[Config]) -> None:
        """Param order (blocks first) and loss order (built-in losses, then forward-only ones)."""
        m, dev = self.m, self.dev
        self.order, self.n_blocks, self.r = (stream_blocks(cfgs) if not self.base and self.data.gather is None
                                             else (list(range(m)), 0, 1))
        by_loss = ([i for i, c in enumerate(cfgs) if c.loss.user is None]
                   + [i for i, c in enumerate(cfgs) if c.loss.user is not None])
        if by_loss != self.order and _as_tight(cfgs, self.order, by_loss, self.data.class_index.counts):
            by_loss = list(self.order)          # the loss's slices are as tight in param order: no permutation
        loss_pos = {c: j for j, c in enumerate(by_loss)}
        self.loss_cfgs, self.cfgs = [cfgs[i] for i in by_loss], [cfgs[i] for i in self.order]
        self.nb = sum(c.loss.user is None for c in self.loss_cfgs)
        param_to_loss = [loss_pos[i] for i in self.order]          # param position -> loss position
        self.permuted = param_to_loss != list(range(m))
        self.to_param = torch.tensor(param_to_loss, device=dev)
        self.to_loss = torch.empty_like(self.to_param).index_copy_(0, self.to_param, torch.arange(m, device=dev))
        self.by_loss = self.to_loss.cpu().tolist()          # the param position of each loss position
        self.n_shared = self.n_blocks * self.r

    def _init_params(self) -> None:
        """Each member's head initialised from its own generator (seeded by its seed), stacked."""
        cfgs, dev, family = self.cfgs, self.dev, self.family
        self.w0c = self.data.w0.detach().float().cpu()
        b0c = self.data.b0.detach().float().cpu()
        self.gens = [torch.Generator().manual_seed(int(c.seed)) for c in cfgs]
        kinds = [H.get_head(c.head) for c in cfgs]
        inits = [H.init_head(kd, c.init, self.w0c, b0c, g, c.bias_init) for kd, c, g in zip(kinds, cfgs, self.gens)]
        self.names = H.param_names(family)
        self.p = {a: torch.stack([i[0][a] for i in inits]).to(dev) for a in self.names}
        self.buf = {a: torch.stack([i[1][a] for i in inits]).to(dev) for a in inits[0][1]}
        if family == "cosine":
            self.buf["scale"] = torch.tensor([float(c.scale) for c in cfgs], device=dev)
        # the training step leaves out what no member uses (MARC's c * ||w_j|| term, frozen parameters)
        self.tbuf = {a: t for a, t in self.buf.items()
                     if a != "u" or family != "affine" or any(kd.uses_base_norm for kd in kinds)}
        self.need = tuple(a for a in self.names if any(a in kd.trained for kd in kinds))
        s_members = [i for i, kd in enumerate(kinds) if "s" in kd.trained]
        self.s_span = (s_members[0], s_members[-1] + 1) if s_members else None     # s = 1 for the others
        # parameters the training forward needs: s and c are the identity (1, 0) unless trained
        self.pf = {a: t for a, t in self.p.items() if a in self.need or (a in ("W", "b") and not self.base)}
        self.kinds = kinds

    def _init_optimiser(self) -> None:
        """Per-member SGD-momentum settings as tensors, momentum buffers, MaxNorm radii."""
        cfgs, dev, m, p, need = self.cfgs, self.dev, self.m, self.p, self.need

        def lr_mult(kd: H.HeadKind, c: Config, a: str) -> float:
            if a not in kd.trained:
                return 0.0
            return c.lr_factor if a in kd.slow else 1.0

        self.shape = {a: (m,) + (1,) * (p[a].dim() - 1) for a in self.names}
        self.lrm = {a: torch.tensor([lr_mult(kd, c, a) for kd, c in zip(self.kinds, cfgs)], device=dev) for a in need}
        # weight decay per parameter: 0 on a member's ``no_wd`` parameters (the CB repo's sigmoid bias)
        self.wd = {a: torch.tensor([0.0 if a in c.no_wd else c.wd for c in cfgs], device=dev).view(self.shape[a])
                   for a in need}
        self.any_wd = any(c.wd for c in cfgs)
        self.mom = torch.tensor([c.momentum for c in cfgs], device=dev)
        self.mbuf = {a: torch.zeros_like(p[a]) for a in need}
        self.uniform_mom = len({c.momentum for c in cfgs}) == 1
        self.momentum = float(cfgs[0].momentum)
        # the last (epoch, step) at which each member trains: after it, a member's momentum buffer
        # no longer matters, so a step whose only inactive members are finished can use the fused
        # update (one momentum factor for all); a member paused mid-run needs the masked update.
        self.last = [(c.epochs - 1, self._steps(c) - 1) for c in cfgs]
        self.use_maxnorm = any(c.maxnorm_thresh is not None for c in cfgs)
        if self.use_maxnorm:
            self.radius = torch.tensor([maxnorm_radius(self.w0c, c.maxnorm_thresh) if c.maxnorm_thresh is not None
                                        else float("inf") for c in cfgs], device=dev).view(m, 1)

    def _steps(self, c: Config) -> int:
        """Batches per epoch of member ``c`` (its sampler's epoch cut by its step rule)."""
        ci = self.data.class_index
        return steps_per_epoch(c.sampler, ci.n, self.bsz, c.steps, epoch_samples(c.sampler, ci))

    def _init_losses(self) -> None:
        """The built-in losses stacked (:func:`stack_specs`); forward-only losses get dL/dz by
        autograd, placed into the group's dz (the head backward and the update stay the engine's)."""
        nb, m, dev, counts = self.nb, self.m, self.dev, self.data.class_index.counts
        self.lb = stack_specs([c.loss for c in self.loss_cfgs[:nb]], counts, dev) if nb else None
        self.user = (AutogradLossGrad([c.loss for c in self.loss_cfgs[nb:]], [c.method for c in self.loss_cfgs[nb:]],
                                      counts, dev) if nb < m else None)
        self.user_pos = torch.tensor(self.by_loss[nb:], device=dev, dtype=torch.long)   # their param positions
        self.head_grad: dict = {}

    def _init_inputs(self) -> None:
        """The flat cache rows, the stage-1 layer on the device and, for a frozen-base group,
        the stage-1 logits of every cache row (K numbers per row instead of D), once."""
        data, dev = self.data, self.dev
        self.x_flat = data.x.reshape(self.n * self.n_views, self.d)
        self.w0, self.b0 = data.w0.detach().to(dev, torch.float32), data.b0.detach().to(dev, torch.float32)
        if self.base and data.gather is None:
            self.table = torch.cat([torch.addmm(self.b0, self.x_flat[i:i + 65536].float(), self.w0.t())
                                    for i in range(0, self.x_flat.shape[0], 65536)])
        self.x_dtype = feature_dtype(data.precision)         # of features from a gather source
        self.no_rest = self.x_flat.new_empty((0, self.bsz, self.d))        # every member in a block
        self.epochs = max(c.epochs for c in self.cfgs)
        self.total_steps = sum(max(self._steps(c) for c in self.cfgs if e < c.epochs)
                               for e in range(self.epochs))

    def _init_selection(self) -> None:
        """The best val accuracy and epoch of each member so far (``select="val"``)."""
        self.best_acc = torch.full((self.m,), -1.0, dtype=torch.float64, device=self.dev)
        self.best_epoch = torch.tensor([c.epochs for c in self.cfgs])
        self.bad_epoch = torch.zeros(self.m, dtype=torch.long, device=self.dev)    # 0: finite so far
        self.best = {a: t.clone() for a, t in self.p.items()} if self.select == "val" else None

    # -- an epoch -----------------------------------------------------------------------------

    def prepare_epoch(self, e: int) -> Epoch:
        """Everything epoch ``e``'s steps read, made ahead (on a worker thread, while the previous
        epoch trains): its index batches, loss targets, momentum/lr factors, paused steps."""
        m, bsz, dev, nb, need, shape = self.m, self.bsz, self.dev, self.nb, self.need, self.shape
        parts = _epoch_batches(self.cfgs, self.data.class_index, self.gens, e, self.n_views)
        s_max = max(p[0].shape[0] for p in parts)
        rows, valid = _stacked(parts, 0, range(m), s_max, 0), _stacked(parts, 2, range(m), s_max, False)
        # labels and validity in loss order (stacked so, not permuted after)
        loss_order = self.by_loss if self.permuted else range(m)
        valid_l = _stacked(parts, 2, loss_order, s_max, False) if self.permuted else valid
        ys_s = _stacked(parts, 1, loss_order, s_max, 0).transpose(0, 1).contiguous().to(dev)      # [S, M, B]
        vf_s = valid_l.transpose(0, 1).contiguous().to(dev, torch.float32)
        act_cpu = valid.any(-1).t().contiguous()                                   # [S, M]
        # steps of this epoch before each member's last step: (e, s) < (last epoch, last step)
        lim = torch.tensor([s_max if le > e else (ls if le == e else 0) for le, ls in self.last])
        act = act_cpu.to(dev, torch.float32)
        lr_e = torch.tensor([c.lr_at(e) if e < c.epochs else 0.0 for c in self.cfgs], device=dev)
        per_step = lambda t: t.unbind(0)                                         # noqa: E731 (views, one op)
        user_step = None
        if nb == m:
            targets = loss_targets(self.lb, ys_s, vf_s)                            # the epoch's, at once
        else:
            targets = (loss_targets(self.lb, ys_s[:, :nb], vf_s[:, :nb]) if nb
                       else LossTargets(*([None] * len(LossTargets._fields))))
            uvalid = valid_l[nb:]                                                  # [mu, S, B] CPU
            un = uvalid.sum(-1)
            user_step = SimpleNamespace(
                y=per_step(ys_s[:, nb:]), valid=per_step(vf_s[:, nb:]), n=un.t().tolist(),
                prefix=bool((uvalid == (torch.arange(bsz) < un.unsqueeze(-1))).all()))
        shared = None
        n_blocks, r, n_shared = self.n_blocks, self.r, self.n_shared
        if n_blocks:
            blk_rows = rows[:n_shared].view(n_blocks, r, s_max, bsz)
            blk_valid = valid[:n_shared].view(n_blocks, r, s_max, bsz)
            if bool((blk_rows == blk_rows[:, :1]).all()) and bool((blk_valid == blk_valid[:, :1]).all()):
                shared = (per_step(rows[:n_shared:r].transpose(0, 1).reshape(s_max, n_blocks * bsz).to(dev)),
                          per_step(rows[n_shared:].transpose(0, 1).reshape(s_max, (m - n_shared) * bsz).to(dev)))
        return Epoch(
            s_max=s_max, shared=shared, user=user_step,
            rows=per_step(rows.transpose(0, 1).reshape(s_max, m * bsz).to(dev)),     # [M*B] per step
            valid=per_step(valid.transpose(0, 1).reshape(s_max, m * bsz)),
            targets=[LossTargets(*f) for f in zip(*(per_step(t) if t is not None else [None] * s_max
                                                   for t in targets))],
            paused=(~act_cpu & (torch.arange(s_max).unsqueeze(1) < lim)).any(1).tolist(),
            c_mom={a: per_step((1 - act * (1 - self.mom)).view((s_max,) + shape[a])) for a in need},
            act={a: per_step(act.view((s_max,) + shape[a])) for a in need},
            neg_lr={a: per_step((act * (lr_e * self.lrm[a])).neg().view((s_max,) + shape[a])) for a in need})

    # -- a step -------------------------------------------------------------------------------

    def step(self, ep: Epoch, s: int) -> None:
        """One training step of every member: features -> forward -> loss gradient -> backward
        and SGD-momentum update."""
        xb = self.features(ep, s)
        z, ctx = H.forward_train(self.family, self.pf, self.tbuf, xb, self.base)       # [M, K, B]
        dz = self.loss_grad(ep, s, z, xb)
        self.update(ep, s, ctx, dz)

    def features(self, ep: Epoch, s: int):
        """Step s's inputs: [M, B, D] features, [M, B, K] base logits for a frozen-base group,
        or SharedRows (one gather per block of members on the same rows)."""
        x_flat, bsz, m = self.x_flat, self.bsz, self.m
        if ep.shared:
            rest = (x_flat.index_select(0, ep.shared[1][s]).view(m - self.n_shared, bsz, self.d)
                    if m > self.n_shared else self.no_rest)
            return H.SharedRows(x_flat.index_select(0, ep.shared[0][s]).view(self.n_blocks, bsz, self.d), self.r, rest)
        rows, gather = ep.rows[s], self.data.gather
        if gather is not None:
            xb = gather(rows, ep.valid[s])
            if self.base:
                return torch.addmm(self.b0, xb, self.w0.t()).view(m, bsz, self.k)
            return xb.to(self.x_dtype).view(m, bsz, self.d)
        if self.base:
            return self.table.index_select(0, rows).view(m, bsz, self.k)
        return x_flat.index_select(0, rows).view(m, bsz, self.d)

    def loss_grad(self, ep: Epoch, s: int, z: torch.Tensor, xb=None) -> torch.Tensor:
        """dL/dz [M, K, B] (param order) of every member's loss: analytic for the built-in
        losses (in loss order), through the fallback for the plugin ones (which may read the
        step's features ``xb`` and the head's parameters; the latter's gradient is kept in
        ``self.head_grad`` for :meth:`update`)."""
        lb, targets, permuted, nb = self.lb, ep.targets, self.permuted, self.nb
        if self.user is not None:
            zl = z.index_select(0, self.to_loss) if permuted else z
            dz = torch.empty_like(zl)
            if nb:
                dz[:nb] = batched_loss_grad(zl[:nb], None, None, lb, targets[s])
            u = ep.user
            h = head = None
            if "h" in self.user.reads:
                h = H.dense(xb).index_select(0, self.user_pos)
            if "head" in self.user.reads:
                head = {a: t.index_select(0, self.user_pos) for a, t in self.p.items()}
            dz[nb:] = self.user(zl[nb:], u.y[s], u.valid[s], u.n[s], u.prefix, h=h, head=head)
            self.head_grad = self.user.head_grad
            return dz.index_select(0, self.to_param) if permuted else dz
        if permuted:
            dz = batched_loss_grad(z.index_select(0, self.to_loss), None, None, lb, targets[s])
            return dz.index_select(0, self.to_param)
        return batched_loss_grad(z, None, None, lb, targets[s])

    def update(self, ep: Epoch, s: int, ctx, dz: torch.Tensor) -> None:
        """The head's backward and the SGD-momentum update (PyTorch semantics: g += wd p;
        buf = mu buf + g; p -= lr buf)."""
        p, mbuf, wd, need, neg_lr, any_wd = self.p, self.mbuf, self.wd, self.need, ep.neg_lr, self.any_wd
        if self.uniform_mom and not ep.paused[s]:
            # fused: mbuf = mu mbuf + grad (+ wd p); finished members get lr 0
            H.backward(self.family, self.pf, self.tbuf, ctx, dz, need, into=mbuf, beta=self.momentum,
                       s_span=self.s_span)
            for a in need:
                if a in self.head_grad:                 # a plugin loss's own gradient of the head parameters
                    mbuf[a].index_add_(0, self.user_pos, self.head_grad[a])
                if any_wd:
                    mbuf[a].addcmul_(p[a], wd[a])
                p[a].addcmul_(mbuf[a], neg_lr[a][s])
        else:
            grads = H.backward(self.family, self.pf, self.tbuf, ctx, dz, need, s_span=self.s_span)
            c_mom, act_v = ep.c_mom, ep.act
            for a in need:
                g = grads[a]
                if a in self.head_grad:
                    g.index_add_(0, self.user_pos, self.head_grad[a])
                if any_wd:
                    g.addcmul_(p[a], wd[a])
                mbuf[a].mul_(c_mom[a][s]).addcmul_(g, act_v[a][s])
                p[a].addcmul_(mbuf[a], neg_lr[a][s])

    # -- end of an epoch, end of training -------------------------------------------------------

    def end_epoch(self, e: int) -> None:
        """After epoch ``e``'s last step: the non-finite check, the MaxNorm projection, then val selection."""
        # a member whose parameters turned non-finite at any step of this epoch (a loss that became
        # NaN / inf) is marked failed with that epoch; kept on the device: no sync until collect
        finite = torch.stack([self.p[a].reshape(self.m, -1).isfinite().all(1) for a in self.names]).all(0)
        self.bad_epoch = torch.where(~finite & (self.bad_epoch == 0), e + 1, self.bad_epoch)
        if self.use_maxnorm:
            # LTWB PGD: once per epoch, after the last batch, rows with ||w_j|| > r -> w_j r/||w_j||
            live = torch.tensor([e < c.epochs for c in self.cfgs], device=self.dev).view(self.m, 1)
            norms = self.p["W"].norm(dim=-1)
            factor = torch.where(live, (self.radius / norms.clamp_min(1e-12)).clamp(max=1.0), torch.ones_like(norms))
            self.p["W"].mul_(factor.unsqueeze(-1))
        if self.select == "val":
            acc = _val_accuracy(self.family, self.p, self.buf, self.data)
            live = torch.tensor([e < c.epochs for c in self.cfgs], device=self.dev)
            better = live & (acc > self.best_acc)      # ties keep the earlier epoch
            self.best_acc = torch.where(better, acc, self.best_acc)
            self.best_epoch = torch.where(better.cpu(), torch.tensor(e + 1), self.best_epoch)
            for a in self.names:
                self.best[a] = torch.where(better.view(self.shape[a]), self.p[a], self.best[a])

    def collect(self) -> list[TrainedHead]:
        """Every member's deployable layer (the kept epoch's), in the caller's order."""
        final = self.best if self.select == "val" else self.p
        out: list = [None] * self.m
        bad = self.bad_epoch.tolist()
        for i, c in enumerate(self.cfgs):
            layer = H.effective(self.family, {a: final[a][i].cpu() for a in self.names},
                                {a: self.buf[a][i].cpu() for a in self.buf})
            failed = (f"its parameters became non-finite (NaN or inf) during epoch {bad[i]} of {c.epochs}: the loss "
                      "diverged; lower the lr or make the loss finite" if bad[i] else None)
            out[self.order[i]] = TrainedHead(config=c, layer=layer, selected_epoch=int(self.best_epoch[i]),
                                             failed=failed)
        return out


def _as_tight(cfgs: Sequence[Config], order: list, by_loss: list, counts: torch.Tensor) -> bool:
    """Whether the built-in losses of ``cfgs`` taken in ``order`` run their optional parts on
    slices no wider (and forms no less pure) than in ``by_loss`` order; then the loss can read
    the members in ``order`` with no permutation per step (any order is exact: members inside
    a slice that do not use its part have neutral values)."""
    if any(c.loss.user is not None for c in cfgs):
        return False
    a, b = (stack_specs([cfgs[i].loss for i in o], counts, "cpu") for o in (order, by_loss))

    def width(lb):
        return sum(e - f for f, e in lb.ranges.values())
    return width(a) <= width(b) and set(a.pure_forms) >= set(b.pure_forms)


def _epoch_batches(cfgs: Sequence[Config], ci: ClassIndex, gens, epoch: int, n_views: int) -> list:
    """Index batches of one epoch, per config (its sampler and step rule): (flat rows [S_i, B],
    labels, valid [S_i, B]).
    Configs with the same :func:`stream_key` draw identical batches, so each stream is drawn
    once, from its first member's generator (the others' generators are then never read)."""
    b = cfgs[0].batch_size
    drawn: dict[tuple, tuple] = {}
    out = []
    for c, g in zip(cfgs, gens):
        key = stream_key(c)
        if key not in drawn:
            if epoch < c.epochs:
                idx, valid = epoch_indices(c.sampler, ci, b, epoch, c.epochs, g, steps=c.steps)
                if n_views > 1:
                    view = torch.randint(n_views, (ci.n,), generator=g)
                    flat = idx * n_views + view[idx]
                else:
                    flat = idx
            else:
                idx = torch.zeros(1, b, dtype=torch.long)
                flat, valid = idx, torch.zeros(1, b, dtype=torch.bool)
            drawn[key] = (flat, ci.labels[idx], valid)
        out.append(drawn[key])
    return out


def _stacked(parts: list, field: int, order, s: int, fill) -> torch.Tensor:
    """Field ``field`` of :func:`_epoch_batches`' parts in ``order``, padded to s steps: [M, S, B]."""
    def pad(t):
        return t if t.shape[0] == s else torch.cat([t, t.new_full((s - t.shape[0], t.shape[1]), fill)])
    return torch.stack([pad(parts[i][field]) for i in order])


def maxnorm_radius(w0: torch.Tensor, thresh: float) -> float:
    """LTWB ``MaxNorm_via_PGD.setPerLayerThresh`` on the stage-1 weights:
    r = min_j ||w_j|| + thresh * (max_j ||w_j|| - min_j ||w_j||)."""
    norms = w0.double().norm(dim=1)
    return float(norms.min() + thresh * (norms.max() - norms.min()))


def eval_logits(family: str, p: dict, buf: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits [m, N, K] of m stacked heads on x [N, V, D], averaged over the V views
    (head applied per view, then averaged: exact for cosine heads too)."""
    out = None
    for v in range(x.shape[1]):
        z = H.forward(family, p, buf, x[:, v].unsqueeze(0))
        out = z if out is None else out + z
    return out / x.shape[1]


def _val_accuracy(family: str, p: dict, buf: dict, data: TrainData) -> torch.Tensor:
    """Class-mean val accuracy [m] of the group's current heads (in chunks of heads)."""
    m = next(iter(p.values())).shape[0]
    k = data.w0.shape[0]
    n = data.val_x.shape[0]
    chunk = max(1, EVAL_CHUNK // max(1, n * k))
    accs = []
    for i in range(0, m, chunk):
        pp = {a: t[i:i + chunk] for a, t in p.items()}
        bb = {a: t[i:i + chunk] for a, t in buf.items()}
        pred = eval_logits(family, pp, bb, data.val_x).argmax(-1)
        accs.append(class_mean_accuracy(pred, data.val_labels, k))
    return torch.cat(accs)
