"""A group's epoch made ahead (on a thread, while the previous epoch trains): every member's
index batches (its sampler, its view per sample, its generator), the loss targets and the
update's per-member factors, as one tuple of views per step (:class:`Epoch`).

A member with fewer steps or epochs than the group is padded with invalid samples and inactive
steps (no update, no momentum decay); a member whose batch size is below the group's (a merged
group, :func:`~ltcache.stage2.workers.merge_plan`) has its batches padded with invalid samples
(the losses average over valid samples only, so its steps are those it would take alone). Members with the same
:func:`~ltcache.stage2.grouping.stream_key` draw their batches once.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from ltcache.stage2.grouping import stream_key
from ltcache.stage2.losses import LossTargets, loss_targets
from ltcache.stage2.plan import Config
from ltcache.stage2.samplers import ClassIndex, epoch_indices


@dataclass
class Epoch:
    """Everything one epoch's steps read, made ahead: per step (tuples of views, one per step)
    the gathered rows, loss targets and the update's per-member factors."""

    s_max: int                 # steps (the longest member's)
    rows: tuple                # flat cache rows [M*B] (param order)
    valid: tuple               # [M*B] bool, CPU
    shared: Optional[tuple]    # (rows of the blocks' first members, rows of the rest) or None
    targets: list              # LossTargets of the built-in losses (loss order), per step
    user: Optional[SimpleNamespace]   # labels / valid / counts of the forward-only losses
    paused: list               # a step where some member pauses mid-run (needs the masked update)
    c_mom: dict                # momentum factor: mu for an active member, 1 for an inactive one
    act: dict                  # 1 for an active member, 0 otherwise
    neg_lr: dict               # -lr x the parameter's lr factor for an active member, 0 otherwise
    target_steps: tuple = ()   # the targets field by field: Steps (or None), each with its [S, ...] whole


class Steps(tuple):
    """Per-step views of one epoch tensor [S, ...] (``whole``), read by step: ``steps[s]``."""

    whole: torch.Tensor


def _per_step(t: torch.Tensor) -> Steps:
    out = Steps(t.unbind(0))                                    # views, one op
    out.whole = t
    return out


def make_epoch(g, e: int) -> Epoch:
    """Epoch ``e`` of the group trainer ``g`` (:class:`~ltcache.stage2.group.GroupTrainer`): its
    index batches, loss targets, momentum/lr factors and paused steps."""
    m, dev, opt = g.m, g.dev, g.opt
    parts = epoch_batches(g.cfgs, g.data.class_index, g.gens, e, g.n_views, g.bsz)
    s_max = max(p[0].shape[0] for p in parts)
    rows, valid = _stacked(parts, 0, range(m), s_max, 0), _stacked(parts, 2, range(m), s_max, False)
    # labels and validity in loss order (stacked so, not permuted after)
    loss_order = g.by_loss if g.permuted else range(m)
    valid_l = _stacked(parts, 2, loss_order, s_max, False) if g.permuted else valid
    ys_s = _stacked(parts, 1, loss_order, s_max, 0).transpose(0, 1).contiguous().to(dev)      # [S, M, B]
    vf_s = valid_l.transpose(0, 1).contiguous().to(dev, torch.float32)
    act_cpu = valid.any(-1).t().contiguous()                                   # [S, M]
    # steps of this epoch before each member's last step: (e, s) < (last epoch, last step)
    lim = torch.tensor([s_max if le > e else (ls if le == e else 0) for le, ls in opt.last])
    act = act_cpu.to(dev, torch.float32)
    lr_e = torch.tensor([c.lr_at(e) if e < c.epochs else 0.0 for c in g.cfgs], device=dev)
    targets, user = _targets(g, ys_s, vf_s, valid_l)
    target_steps = tuple(_per_step(t) if t is not None else None for t in targets)
    need, shape = g.need, opt.shape
    return Epoch(
        s_max=s_max, shared=_shared_rows(g, rows, valid, s_max), user=user,
        rows=_per_step(rows.transpose(0, 1).reshape(s_max, m * g.bsz).to(dev)),     # [M*B] per step
        valid=_per_step(valid.transpose(0, 1).reshape(s_max, m * g.bsz)),
        targets=[LossTargets(*f) for f in zip(*(t if t is not None else [None] * s_max for t in target_steps))],
        target_steps=target_steps,
        paused=(~act_cpu & (torch.arange(s_max).unsqueeze(1) < lim)).any(1).tolist(),
        c_mom={a: _per_step((1 - act * (1 - opt.mom)).view((s_max,) + shape[a])) for a in need},
        act={a: _per_step(act.view((s_max,) + shape[a])) for a in need},
        neg_lr={a: _per_step((act * (lr_e * opt.lrm[a])).neg().view((s_max,) + shape[a])) for a in need})


def _targets(g, ys_s: torch.Tensor, vf_s: torch.Tensor, valid_l: torch.Tensor) -> tuple:
    """The epoch's loss targets of the ``nb`` built-in losses (all steps at once) and, for the
    forward-only losses after them, their labels / valid / counts per step (or None)."""
    nb, m = g.nb, g.m
    if nb == m:
        return loss_targets(g.lb, ys_s, vf_s), None
    targets = (loss_targets(g.lb, ys_s[:, :nb], vf_s[:, :nb]) if nb
               else LossTargets(*([None] * len(LossTargets._fields))))
    uvalid = valid_l[nb:]                                                  # [mu, S, B] CPU
    un = uvalid.sum(-1)
    user = SimpleNamespace(
        y=_per_step(ys_s[:, nb:]), valid=_per_step(vf_s[:, nb:]), n=un.t().tolist(),
        prefix=bool((uvalid == (torch.arange(g.bsz) < un.unsqueeze(-1))).all()))
    return targets, user


def _shared_rows(g, rows: torch.Tensor, valid: torch.Tensor, s_max: int) -> Optional[tuple]:
    """Per step, the rows of each block's first member and of the other members -- when every
    block's members did draw the same rows this epoch (else None: a gather per member)."""
    n_blocks, r, n_shared, bsz = g.n_blocks, g.r, g.n_shared, g.bsz
    if not n_blocks:
        return None
    blk_rows = rows[:n_shared].view(n_blocks, r, s_max, bsz)
    blk_valid = valid[:n_shared].view(n_blocks, r, s_max, bsz)
    if not (bool((blk_rows == blk_rows[:, :1]).all()) and bool((blk_valid == blk_valid[:, :1]).all())):
        return None
    return (_per_step(rows[:n_shared:r].transpose(0, 1).reshape(s_max, n_blocks * bsz).to(g.dev)),
            _per_step(rows[n_shared:].transpose(0, 1).reshape(s_max, (g.m - n_shared) * bsz).to(g.dev)))


def epoch_batches(cfgs: Sequence[Config], ci: ClassIndex, gens, epoch: int, n_views: int,
                  width: Optional[int] = None) -> list:
    """Index batches of one epoch, per config (its sampler, step rule and batch size): (flat
    rows [S_i, width], labels, valid [S_i, width]); a batch smaller than ``width`` (default: the
    largest batch size) is padded with invalid samples.
    Configs with the same :func:`stream_key` draw identical batches, so each stream is drawn
    once, from its first member's generator (the others' generators are then never read)."""
    width = width or max(c.batch_size for c in cfgs)
    drawn: dict[tuple, tuple] = {}
    out = []
    for c, gen in zip(cfgs, gens):
        key = stream_key(c)
        if key not in drawn:
            b = c.batch_size
            if epoch < c.epochs:
                idx, valid = epoch_indices(c.sampler, ci, b, epoch, c.epochs, gen, steps=c.steps)
                if n_views > 1:
                    view = torch.randint(n_views, (ci.n,), generator=gen)
                    flat = idx * n_views + view[idx]
                else:
                    flat = idx
            else:
                idx = torch.zeros(1, b, dtype=torch.long)
                flat, valid = idx, torch.zeros(1, b, dtype=torch.bool)
            labels = ci.labels[idx]
            if b < width:                                   # padded columns: row 0, invalid
                flat, labels, valid = (_widen(t, width, f) for t, f in ((flat, 0), (labels, 0), (valid, False)))
            drawn[key] = (flat, labels, valid)
        out.append(drawn[key])
    return out


def _widen(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    """[S, b] -> [S, width], the new columns ``fill``."""
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), fill)], 1)


def _stacked(parts: list, field: int, order, s: int, fill) -> torch.Tensor:
    """Field ``field`` of :func:`epoch_batches`' parts in ``order``, padded to s steps: [M, S, B]."""
    def pad(t):
        return t if t.shape[0] == s else torch.cat([t, t.new_full((s - t.shape[0], t.shape[1]), fill)])
    return torch.stack([pad(parts[i][field]) for i in order])
