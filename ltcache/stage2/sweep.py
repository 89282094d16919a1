"""The batched stage-2 engine: M head configurations trained as one computation.

Configurations that share a head family and a batch size form a group. Their parameters
are stacked ([M, K, D] ...). Per epoch, every configuration draws its own index batches
(its sampler, its view per sample, its ``torch.Generator`` seeded by its seed) as one
tensor [M, S, B]; a configuration with fewer steps or epochs than the group is padded with
invalid samples and inactive steps (no update, no momentum decay). Per step there is one
gather, one batched matmul, one vectorised loss over all M configurations (per-configuration
hyper-parameters as tensors) and one hand-written batched SGD-momentum update. Python loops
run over epochs, steps and parameter names, never over configurations inside a step.

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
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ltcache.errors import LtcacheError
from ltcache.progress import progress
from ltcache.stage2 import heads as H
from ltcache.stage2.losses import LossSpec, batched_loss, stack_specs
from ltcache.stage2.samplers import ClassIndex, epoch_indices, steps_per_epoch

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


def group_key(cfg: Config) -> tuple:
    """Configurations with equal keys are trained as one stacked group."""
    return (H.get_head(cfg.head).family, cfg.batch_size)


def train_sweep(configs: Sequence[Config], data: TrainData, select: str = "last",
                quiet: bool = False) -> list[TrainedHead]:
    """Train every configuration; groups by :func:`group_key`; results in input order."""
    if select not in ("last", "val"):
        raise LtcacheError(f"unknown --select '{select}'; use last or val")
    if select == "val" and data.val_x is None:
        raise LtcacheError("--select val needs a val split in the cache; use --select last "
                           "or extract the cache with a val split")
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(group_key(c), []).append(i)
    out: list[Optional[TrainedHead]] = [None] * len(configs)
    for key, members in groups.items():
        trained = train_group([configs[i] for i in members], data, select=select, quiet=quiet)
        for i, t in zip(members, trained):
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


def train_group(cfgs: Sequence[Config], data: TrainData, select: str = "last",
                quiet: bool = False) -> list[TrainedHead]:
    """Train M configurations of one group (same head family and batch size) together."""
    family = H.get_head(cfgs[0].head).family
    bsz = cfgs[0].batch_size
    if any(group_key(c) != (family, bsz) for c in cfgs):
        raise ValueError("train_group needs configurations of one head family and batch size")
    dev, m = data.x.device, len(cfgs)
    n, n_views, d = data.x.shape
    k = data.w0.shape[0]
    w0c, b0c = data.w0.detach().float().cpu(), data.b0.detach().float().cpu()

    gens = [torch.Generator().manual_seed(int(c.seed)) for c in cfgs]
    inits = [H.init_head(H.get_head(c.head), c.init, w0c, b0c, g, c.bias_init) for c, g in zip(cfgs, gens)]
    names = H.param_names(family)
    p = {a: torch.stack([i[0][a] for i in inits]).to(dev).requires_grad_(True) for a in names}
    buf = {a: torch.stack([i[1][a] for i in inits]).to(dev) for a in inits[0][1]}
    if family == "cosine":
        buf["scale"] = torch.tensor([float(c.scale) for c in cfgs], device=dev)

    def lr_mult(c: Config, a: str) -> float:
        kind = H.get_head(c.head)
        if a not in kind.trained:
            return 0.0
        return c.lr_factor if a in kind.slow else 1.0

    shape = {a: (m,) + (1,) * (p[a].dim() - 1) for a in names}
    lrm = {a: torch.tensor([lr_mult(c, a) for c in cfgs], device=dev) for a in names}
    wd = {a: torch.tensor([c.wd for c in cfgs], device=dev).view(shape[a]) for a in names}
    mom = torch.tensor([c.momentum for c in cfgs], device=dev)
    mbuf = {a: torch.zeros_like(p[a]) for a in names}
    lb = stack_specs([c.loss for c in cfgs], data.class_index.counts, dev)
    use_maxnorm = any(c.maxnorm_thresh is not None for c in cfgs)
    if use_maxnorm:
        radius = torch.tensor([maxnorm_radius(w0c, c.maxnorm_thresh) if c.maxnorm_thresh is not None
                               else float("inf") for c in cfgs], device=dev).view(m, 1)

    x_flat = data.x.reshape(n * n_views, d)
    labels_dev = data.labels
    epochs = max(c.epochs for c in cfgs)
    total = sum(max(steps_per_epoch(c.sampler, n, bsz) for c in cfgs if e < c.epochs) for e in range(epochs))
    best_acc = torch.full((m,), -1.0, dtype=torch.float64, device=dev)
    best_epoch = torch.tensor([c.epochs for c in cfgs])
    best = {a: t.detach().clone() for a, t in p.items()} if select == "val" else None
    params = [p[a] for a in names]

    bar = progress(total=total, desc=f"train {family} B={bsz} x{m}", quiet=quiet, unit="step")
    for e in range(epochs):
        rows, ys, valid = _epoch_batches(cfgs, data.class_index, gens, e, n_views)
        s_max = rows.shape[1]
        rows, ys = rows.to(dev, non_blocking=True), ys.to(dev, non_blocking=True)
        vf = valid.to(dev, non_blocking=True).to(x_flat.dtype)
        act = valid.any(-1).to(dev).to(x_flat.dtype).t().contiguous()             # [S, M]
        lr_e = torch.tensor([c.lr_at(e) if e < c.epochs else 0.0 for c in cfgs], device=dev)
        c_mom = 1 - act * (1 - mom)                                                # [S, M]
        c_lr = {a: act * (lr_e * lrm[a]) for a in names}                            # [S, M]
        for s in range(s_max):
            if data.gather is None:
                xb = x_flat.index_select(0, rows[:, s].reshape(-1)).view(m, bsz, d)
            else:
                xb = data.gather(rows[:, s].reshape(-1), valid[:, s].reshape(-1)).view(m, bsz, d)
            z = H.forward(family, p, buf, xb)
            loss = batched_loss(z, ys[:, s], vf[:, s], lb).sum()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for a, g in zip(names, grads):
                    sh = shape[a]
                    g.addcmul_(p[a], wd[a])
                    mbuf[a].mul_(c_mom[s].view(sh)).addcmul_(g, act[s].view(sh))
                    p[a].addcmul_(mbuf[a], c_lr[a][s].view(sh), value=-1.0)
        bar.update(s_max)
        with torch.no_grad():
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
                    best[a] = torch.where(better.view(shape[a]), p[a].detach(), best[a])
    bar.close()

    final = best if select == "val" else {a: t.detach() for a, t in p.items()}
    out = []
    for i, c in enumerate(cfgs):
        layer = H.effective(family, {a: final[a][i].cpu() for a in names}, {a: buf[a][i].cpu() for a in buf})
        out.append(TrainedHead(config=c, layer=layer, selected_epoch=int(best_epoch[i])))
    return out
