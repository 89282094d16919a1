"""The batched stage-2 engine: M head configurations trained as one computation.

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

Where the time goes: on a GPU or with large shapes (D 512+) the two bmm per step dominate,
with the element-wise loss work next (about a third of a D 512 step on a CPU). On a CPU with
small shapes (CIFAR-10, D 64) a step costs mostly per-op overhead, so the engine prepares each
epoch's indices and loss targets ahead on a thread and, on several cores, trains whole groups
side by side in forked single-thread worker processes (``n_jobs``, see
:mod:`ltcache.stage2.workers`; also used up to D 1024).

Optimiser: PyTorch SGD semantics (dampening 0, no Nesterov): g += wd * p; buf = mu * buf + g
(buf = g on the first step); p -= lr * buf.

Learning-rate schedules, per epoch (METHODS.md §0.3(5)):
* ``cosine``       lr_e = lr/2 (1 + cos(pi e / E)), e = 0..E-1 -- LOS (CosineAnnealingLR
                   stepped after each epoch) and MiSLAS (explicit formula). The default.
* ``cosine-start`` lr_e = lr/2 (1 + cos(pi (e+1) / E)) -- cRT, BALMS and LTWB call
                   ``scheduler.step()`` at the start of each epoch under PyTorch >= 1.1, so
                   the last epoch has lr 0.
* ``constant``     lr_e = lr.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

from ltcache.errors import LtcacheError
from ltcache.progress import progress
from ltcache.stage2 import heads as H
from ltcache.stage2.losses import (LossSpec, LossTargets, batched_loss_grad, loss_signature, loss_targets,
                                   stack_specs)
from ltcache.stage2.losses._fallback import AutogradLossGrad
from ltcache.stage2.samplers import ClassIndex, epoch_indices, steps_per_epoch
from ltcache.stage2.workers import in_worker, run_in_workers, worth_workers

SCHEDULES = ("cosine", "cosine-start", "constant")
EVAL_CHUNK = 1 << 25     # elements of a [m, N, K] logits block at evaluation


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

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch`` under this configuration's schedule."""
        if self.schedule == "constant":
            return self.lr
        t = epoch + (1 if self.schedule == "cosine-start" else 0)
        if self.schedule not in SCHEDULES:
            raise LtcacheError(f"unknown schedule '{self.schedule}'; use {', '.join(SCHEDULES)}")
        return 0.5 * self.lr * (1 + math.cos(math.pi * t / self.epochs))


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

    def __post_init__(self):
        if self.class_index is None:
            self.class_index = ClassIndex.from_labels(self.labels.cpu(), self.w0.shape[0])


@dataclass
class TrainedHead:
    """A trained configuration: its deployable layer (CPU) and the epoch kept."""

    config: Config
    layer: dict
    selected_epoch: int
    history: list = field(default_factory=list)


def frozen_base(cfg: Config) -> bool:
    """True for heads that train only the affine s, c on the frozen stage-1 layer (LWS, MARC):
    their base logits x W^T + b never change, so the engine computes them once per cache row."""
    kind = H.get_head(cfg.head)
    return (kind.family == "affine" and cfg.init == "stage1" and cfg.bias_init is None
            and not {"W", "b"} & set(kind.trained))


def group_key(cfg: Config) -> tuple:
    """Configurations with equal keys are trained as one stacked group."""
    return (H.get_head(cfg.head).family, frozen_base(cfg), cfg.batch_size)


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
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(group_key(c), []).append(i)
    out: list[Optional[TrainedHead]] = [None] * len(configs)
    # members needing the same optional loss terms side by side: each term runs on one slice
    def order(i: int) -> tuple:
        return loss_signature(configs[i].loss), "s" in H.get_head(configs[i].head).trained

    plan = [sorted(members, key=order) for members in groups.values()]
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


def _epoch_batches(cfgs: Sequence[Config], ci: ClassIndex, gens, epoch: int, n_views: int):
    """Index batches of one epoch for all configs: flat rows [M,S,B], labels, valid [M,S,B]."""
    b = cfgs[0].batch_size
    rows, labs, vals = [], [], []
    for c, g in zip(cfgs, gens):
        if epoch < c.epochs:
            idx, valid = epoch_indices(c.sampler, ci, b, epoch, c.epochs, g)
            if n_views > 1:
                view = torch.randint(n_views, (ci.n,), generator=g)
                flat = idx * n_views + view[idx]
            else:
                flat = idx
        else:
            idx = torch.zeros(1, b, dtype=torch.long)
            flat, valid = idx, torch.zeros(1, b, dtype=torch.bool)
        rows.append(flat)
        labs.append(ci.labels[idx])
        vals.append(valid)
    s = max(r.shape[0] for r in rows)

    def pad(t, fill):
        if t.shape[0] == s:
            return t
        return torch.cat([t, t.new_full((s - t.shape[0], b), fill)])

    return (torch.stack([pad(r, 0) for r in rows]), torch.stack([pad(y, 0) for y in labs]),
            torch.stack([pad(v, False) for v in vals]))


def stream_blocks(cfgs: Sequence[Config]) -> tuple[list[int], int, int]:
    """A member order with the members that read identical rows in blocks: (order, S, r).

    A configuration's batches depend only on its sampler, seed, epochs and what its head's
    initialisation draws from the same generator first (a fresh or cosine head draws its
    weights); the batch size and views are the group's. Members equal in those read the same
    rows at every step. Blocks hold r members (the r that puts the most members in blocks;
    the larger on ties); the S blocks come first in ``order``, then the other members in their
    given order. S = 0 when no two members share a stream. The engine still checks, each
    epoch, that every block's rows are equal, and gathers per member if they are not."""
    streams: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        draws = H.get_head(c.head).family == "cosine" or c.init == "fresh"
        streams.setdefault((c.sampler, int(c.seed), c.epochs, draws), []).append(i)
    sizes = {len(v) for v in streams.values() if len(v) >= 2}
    if not sizes:
        return list(range(len(cfgs))), 0, 1
    r = max(sizes, key=lambda r: (sum(len(v) // r * r for v in streams.values()), r))
    blocks = [v[j * r:(j + 1) * r] for v in streams.values() for j in range(len(v) // r)]
    inside = {i for b in blocks for i in b}
    return [i for b in blocks for i in b] + [i for i in range(len(cfgs)) if i not in inside], len(blocks), r


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


def _class_mean_acc(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean per-class accuracy of each of m heads, [m] (classes absent from labels skipped)."""
    correct = (logits.argmax(-1) == labels.unsqueeze(0)).double()          # [m, N]
    hits = torch.zeros(correct.shape[0], k, dtype=torch.float64, device=logits.device)
    hits.index_add_(1, labels, correct)
    cnt = torch.bincount(labels, minlength=k).double()
    present = cnt > 0
    return (hits[:, present] / cnt[present]).mean(1)


def _val_accuracy(family: str, p: dict, buf: dict, data: TrainData) -> torch.Tensor:
    m = p["W"].shape[0]
    k = data.w0.shape[0]
    n = data.val_x.shape[0]
    chunk = max(1, EVAL_CHUNK // max(1, n * k))
    accs = []
    for i in range(0, m, chunk):
        pp = {a: t[i:i + chunk] for a, t in p.items()}
        bb = {a: t[i:i + chunk] for a, t in buf.items()}
        accs.append(_class_mean_acc(eval_logits(family, pp, bb, data.val_x), data.val_labels, k))
    return torch.cat(accs)


@torch.no_grad()
def train_group(cfgs: Sequence[Config], data: TrainData, select: str = "last",
                quiet: bool = False, bar_position: int = 0) -> list[TrainedHead]:
    """Train M configurations of one group (same :func:`group_key`) together."""
    key = group_key(cfgs[0])
    family, base, bsz = key
    if any(group_key(c) != key for c in cfgs):
        raise ValueError("train_group needs configurations of one group_key (head family, frozen base, batch size)")
    dev, m = data.x.device, len(cfgs)
    n, n_views, d = data.x.shape
    k = data.w0.shape[0]
    # parameters live in "param order" (members reading the same rows in blocks, see
    # stream_blocks); the loss sees the caller's order (its optional terms on contiguous slices),
    # members with a forward-only loss (autograd fallback) moved after the nb built-in ones
    order, n_blocks, r = (stream_blocks(cfgs) if not base and data.gather is None
                          else (list(range(m)), 0, 1))
    by_loss = ([i for i, c in enumerate(cfgs) if c.loss.user is None]
               + [i for i, c in enumerate(cfgs) if c.loss.user is not None])
    loss_pos = {c: j for j, c in enumerate(by_loss)}
    loss_cfgs, cfgs = [cfgs[i] for i in by_loss], [cfgs[i] for i in order]
    nb = sum(c.loss.user is None for c in loss_cfgs)
    param_to_loss = [loss_pos[i] for i in order]          # param position -> loss position
    permuted = param_to_loss != list(range(m))
    to_param = torch.tensor(param_to_loss, device=dev)
    to_loss = torch.empty_like(to_param).index_copy_(0, to_param, torch.arange(m, device=dev))
    to_loss_cpu = to_loss.cpu()
    n_shared = n_blocks * r
    w0c, b0c = data.w0.detach().float().cpu(), data.b0.detach().float().cpu()

    gens = [torch.Generator().manual_seed(int(c.seed)) for c in cfgs]
    kinds = [H.get_head(c.head) for c in cfgs]
    inits = [H.init_head(kd, c.init, w0c, b0c, g, c.bias_init) for kd, c, g in zip(kinds, cfgs, gens)]
    names = H.param_names(family)
    p = {a: torch.stack([i[0][a] for i in inits]).to(dev) for a in names}
    buf = {a: torch.stack([i[1][a] for i in inits]).to(dev) for a in inits[0][1]}
    if family == "cosine":
        buf["scale"] = torch.tensor([float(c.scale) for c in cfgs], device=dev)
    # the training step leaves out what no member uses (MARC's c * ||w_j|| term, frozen parameters)
    tbuf = {a: t for a, t in buf.items() if a != "u" or any(kd.uses_base_norm for kd in kinds)}
    need = tuple(a for a in names if any(a in kd.trained for kd in kinds))
    s_members = [i for i, kd in enumerate(kinds) if "s" in kd.trained]
    s_span = (s_members[0], s_members[-1] + 1) if s_members else None     # s = 1 for the others

    def lr_mult(kd: H.HeadKind, c: Config, a: str) -> float:
        if a not in kd.trained:
            return 0.0
        return c.lr_factor if a in kd.slow else 1.0

    shape = {a: (m,) + (1,) * (p[a].dim() - 1) for a in names}
    lrm = {a: torch.tensor([lr_mult(kd, c, a) for kd, c in zip(kinds, cfgs)], device=dev) for a in need}
    wd = {a: torch.tensor([c.wd for c in cfgs], device=dev).view(shape[a]) for a in need}
    any_wd = any(c.wd for c in cfgs)
    mom = torch.tensor([c.momentum for c in cfgs], device=dev)
    mbuf = {a: torch.zeros_like(p[a]) for a in need}
    lb = stack_specs([c.loss for c in loss_cfgs[:nb]], data.class_index.counts, dev) if nb else None
    # forward-only losses: dL/dz by autograd, placed into the group's dz (the head backward and
    # the update stay the engine's)
    user = (AutogradLossGrad([c.loss for c in loss_cfgs[nb:]], [c.method for c in loss_cfgs[nb:]],
                             data.class_index.counts, dev) if nb < m else None)
    use_maxnorm = any(c.maxnorm_thresh is not None for c in cfgs)
    if use_maxnorm:
        radius = torch.tensor([maxnorm_radius(w0c, c.maxnorm_thresh) if c.maxnorm_thresh is not None
                               else float("inf") for c in cfgs], device=dev).view(m, 1)

    x_flat = data.x.reshape(n * n_views, d)
    w0, b0 = data.w0.detach().to(dev, torch.float32), data.b0.detach().to(dev, torch.float32)
    if base and data.gather is None:
        # frozen stage-1 layer: its logits of every cache row, once (K numbers per row instead of D)
        table = torch.cat([torch.addmm(b0, x_flat[i:i + 65536].float(), w0.t())
                           for i in range(0, x_flat.shape[0], 65536)])
    epochs = max(c.epochs for c in cfgs)
    total = sum(max(steps_per_epoch(c.sampler, n, bsz) for c in cfgs if e < c.epochs) for e in range(epochs))
    best_acc = torch.full((m,), -1.0, dtype=torch.float64, device=dev)
    best_epoch = torch.tensor([c.epochs for c in cfgs])
    best = {a: t.clone() for a, t in p.items()} if select == "val" else None

    def features(ep: SimpleNamespace, s: int):
        """Step s's inputs: [M, B, D] features, [M, B, K] base logits for a frozen-base group,
        or SharedRows (one gather per block of members on the same rows)."""
        if ep.shared:
            return H.SharedRows(x_flat.index_select(0, ep.shared[0][s]).view(n_blocks, bsz, d), r,
                                x_flat.index_select(0, ep.shared[1][s]).view(m - n_shared, bsz, d))
        rows, valid = ep.rows[s], ep.valid[s]
        if data.gather is not None:
            xb = data.gather(rows, valid)
            return torch.addmm(b0, xb, w0.t()).view(m, bsz, k) if base else xb.view(m, bsz, d)
        if base:
            return table.index_select(0, rows).view(m, bsz, k)
        return x_flat.index_select(0, rows).view(m, bsz, d)

    # parameters the training forward needs: s and c are the identity (1, 0) unless trained
    pf = {a: t for a, t in p.items() if a in need or (a in ("W", "b") and not base)}
    uniform_mom = len({c.momentum for c in cfgs}) == 1
    momentum = float(cfgs[0].momentum)
    # the last (epoch, step) at which each member trains: after it, a member's momentum buffer
    # no longer matters, so a step whose only inactive members are finished can use the fused
    # update (one momentum factor for all); a member paused mid-run needs the masked update.
    last = [(c.epochs - 1, steps_per_epoch(c.sampler, n, bsz) - 1) for c in cfgs]

    label = "frozen-base " if base else ""
    bar = progress(total=total, desc=f"train {label}{family} B={bsz} x{m}", quiet=quiet, unit="step",
                   position=bar_position)
    def prepare(e: int) -> SimpleNamespace:
        """Everything an epoch's steps read, made ahead (on a worker thread, while the previous
        epoch trains): its index batches, loss targets, momentum/lr factors, paused steps."""
        rows, ys, valid = _epoch_batches(cfgs, data.class_index, gens, e, n_views)
        s_max = rows.shape[1]
        ys_s = ys.transpose(0, 1).contiguous().to(dev)                             # [S, M, B]
        vf_s = valid.transpose(0, 1).contiguous().to(dev, torch.float32)
        act_cpu = valid.any(-1).t().contiguous()                                   # [S, M]
        # steps of this epoch before each member's last step: (e, s) < (last epoch, last step)
        lim = torch.tensor([s_max if le > e else (ls if le == e else 0) for le, ls in last])
        act = act_cpu.to(dev, torch.float32)
        lr_e = torch.tensor([c.lr_at(e) if e < c.epochs else 0.0 for c in cfgs], device=dev)
        per_step = lambda t: t.unbind(0)                                         # noqa: E731 (views, one op)
        if permuted:
            ys_s, vf_s = ys_s.index_select(1, to_loss), vf_s.index_select(1, to_loss)
        if nb == m:
            targets = loss_targets(lb, ys_s, vf_s)                                 # the epoch's, at once
        else:
            targets = (loss_targets(lb, ys_s[:, :nb], vf_s[:, :nb]) if nb
                       else LossTargets(*([None] * len(LossTargets._fields))))
            uvalid = (valid.index_select(0, to_loss_cpu) if permuted else valid)[nb:]   # [mu, S, B] CPU
            un = uvalid.sum(-1)
            user_step = SimpleNamespace(
                y=per_step(ys_s[:, nb:]), valid=per_step(vf_s[:, nb:]), n=un.t().tolist(),
                prefix=bool((uvalid == (torch.arange(bsz) < un.unsqueeze(-1))).all()))
        shared = None
        if n_blocks:
            blk_rows = rows[:n_shared].view(n_blocks, r, s_max, bsz)
            blk_valid = valid[:n_shared].view(n_blocks, r, s_max, bsz)
            if bool((blk_rows == blk_rows[:, :1]).all()) and bool((blk_valid == blk_valid[:, :1]).all()):
                shared = (per_step(rows[:n_shared:r].transpose(0, 1).reshape(s_max, n_blocks * bsz).to(dev)),
                          per_step(rows[n_shared:].transpose(0, 1).reshape(s_max, (m - n_shared) * bsz).to(dev)))
        return SimpleNamespace(
            s_max=s_max, shared=shared, user=user_step if nb < m else None,
            rows=per_step(rows.transpose(0, 1).reshape(s_max, m * bsz).to(dev)),     # [M*B] per step
            valid=per_step(valid.transpose(0, 1).reshape(s_max, m * bsz)),
            targets=[LossTargets(*f) for f in zip(*(per_step(t) if t is not None else [None] * s_max
                                                   for t in targets))],
            paused=(~act_cpu & (torch.arange(s_max).unsqueeze(1) < lim)).any(1).tolist(),
            c_mom={a: per_step((1 - act * (1 - mom)).view((s_max,) + shape[a])) for a in need},
            act={a: per_step(act.view((s_max,) + shape[a])) for a in need},
            neg_lr={a: per_step((act * (lr_e * lrm[a])).neg().view((s_max,) + shape[a])) for a in need})

    # prepare the next epoch on a thread when this process runs ops on one thread (or a GPU);
    # beside multi-threaded CPU ops it would only compete for the same cores
    pool = (ThreadPoolExecutor(max_workers=1)
            if dev.type == "cuda" or (not in_worker() and torch.get_num_threads() == 1) else None)
    try:
        upcoming = pool.submit(prepare, 0) if pool else None
        for e in range(epochs):
            ep = upcoming.result() if pool else prepare(e)
            if pool and e + 1 < epochs:
                upcoming = pool.submit(prepare, e + 1)
            s_max, targets, paused = ep.s_max, ep.targets, ep.paused
            c_mom, act_v, neg_lr = ep.c_mom, ep.act, ep.neg_lr
            for s in range(s_max):
                xb = features(ep, s)
                z, ctx = H.forward_train(family, pf, tbuf, xb, base)                   # [M, K, B]
                if user is not None:
                    zl = z.index_select(0, to_loss) if permuted else z
                    dz = torch.empty_like(zl)
                    if nb:
                        dz[:nb] = batched_loss_grad(zl[:nb], None, None, lb, targets[s])
                    u = ep.user
                    dz[nb:] = user(zl[nb:], u.y[s], u.valid[s], u.n[s], u.prefix)
                    if permuted:
                        dz = dz.index_select(0, to_param)
                elif permuted:
                    dz = batched_loss_grad(z.index_select(0, to_loss), None, None, lb, targets[s])
                    dz = dz.index_select(0, to_param)
                else:
                    dz = batched_loss_grad(z, None, None, lb, targets[s])
                if uniform_mom and not paused[s]:
                    # fused: mbuf = mu mbuf + grad (+ wd p); finished members get lr 0
                    H.backward(family, pf, tbuf, ctx, dz, need, into=mbuf, beta=momentum, s_span=s_span)
                    for a in need:
                        if any_wd:
                            mbuf[a].addcmul_(p[a], wd[a])
                        p[a].addcmul_(mbuf[a], neg_lr[a][s])
                else:
                    grads = H.backward(family, pf, tbuf, ctx, dz, need, s_span=s_span)
                    for a in need:
                        g = grads[a]
                        if any_wd:
                            g.addcmul_(p[a], wd[a])
                        mbuf[a].mul_(c_mom[a][s]).addcmul_(g, act_v[a][s])
                        p[a].addcmul_(mbuf[a], neg_lr[a][s])
            bar.update(s_max)
            if use_maxnorm:
                # LTWB PGD: once per epoch, after the last batch, rows with ||w_j|| > r -> w_j r/||w_j||
                live = torch.tensor([e < c.epochs for c in cfgs], device=dev).view(m, 1)
                norms = p["W"].norm(dim=-1)
                factor = torch.where(live, (radius / norms.clamp_min(1e-12)).clamp(max=1.0), torch.ones_like(norms))
                p["W"].mul_(factor.unsqueeze(-1))
            if select == "val":
                acc = _val_accuracy(family, p, buf, data)
                live = torch.tensor([e < c.epochs for c in cfgs], device=dev)
                better = live & (acc > best_acc)      # ties keep the earlier epoch
                best_acc = torch.where(better, acc, best_acc)
                best_epoch = torch.where(better.cpu(), torch.tensor(e + 1), best_epoch)
                for a in names:
                    best[a] = torch.where(better.view(shape[a]), p[a], best[a])
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        bar.close()

    final = best if select == "val" else p
    out: list = [None] * m
    for i, c in enumerate(cfgs):
        layer = H.effective(family, {a: final[a][i].cpu() for a in names}, {a: buf[a][i].cpu() for a in buf})
        out[order[i]] = TrainedHead(config=c, layer=layer, selected_epoch=int(best_epoch[i]))
    return out
