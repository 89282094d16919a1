"""Epoch preparation off the step's path: what a sampler's epoch needs that does not depend
on the random draws, computed once per sweep (per class index and epoch length) instead of
once per member and epoch, and the draws' sort done on integer keys.

The class-aware sampler (:mod:`ltcache.stage2.samplers`, ``cb``) turns random keys into one
permutation per (class, cycle through the class) with a single sort of ``rand + 2 segment``.
Everything but the draws and that sort -- the segment layout, each draw's class visit and
position, the permutation's gather indices -- depends only on the class counts and the
epoch's draws, so :func:`class_aware_plan` makes it once. The sort runs on the keys' IEEE-754
bit patterns read as int64 (for non-negative doubles the same order as the values, so the
same permutation; PyTorch sorts a 1-D int64 tensor by radix, about 5x faster than the
float64 sort on a CPU). The random stream is unchanged: each member still draws from its
own generator, in the same order and the same amounts, so a member's batches are bit for
bit those of the plain sampler.

The weighted samplers (``sqrt``, ``progressive``) keep ``torch.multinomial`` (its binary
search is the cost, and another search gives no saving without another stream); their
per-sample weights are cached per (sampler, epoch weight).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CB_PER_CLASS = 4


@dataclass(frozen=True)
class ClassAwarePlan:
    """The draw-independent part of one class-aware epoch of ``total`` draws."""

    rounds: int              # class-list shuffles (rows of the class keys)
    k: int                   # classes
    visits: int              # class visits (CB_PER_CLASS draws each)
    n_keys: int              # random keys of the per-class permutations
    seg_off: torch.Tensor    # [n_keys] float64: 2 x segment number of each key
    item: torch.Tensor       # [n_keys] long: position of each key inside its class
    seg_base: torch.Tensor   # [K, cycles_max] long: first key of (class, cycle)
    pos: torch.Tensor        # [visits, 4] long: draw number inside the class
    n_c: torch.Tensor        # [K] long: images per class
    start: torch.Tensor      # [K] first position of each class in the class order
    order: torch.Tensor      # [N] sample indices sorted by class
    total: int


def class_aware_plan(ci, total: int) -> ClassAwarePlan:
    """The plan of a class-aware epoch of ``total`` draws over class index ``ci`` (cached on
    ``ci``: made once per sweep and epoch length)."""
    import torch

    cache = ci.__dict__.setdefault("_plans", {})
    if total in cache:
        return cache[total]
    k = len(ci.counts)
    visits = math.ceil(total / CB_PER_CLASS)
    rounds = math.ceil(visits / k)
    visit_no = torch.arange(visits) // k                       # each class once per round
    pos = (visit_no * CB_PER_CLASS).unsqueeze(1) + torch.arange(CB_PER_CLASS)   # [visits, 4]
    counts = ci.counts.clamp_min(1)
    cycles = (rounds * CB_PER_CLASS + counts - 1) // counts                # [K]
    seg_len = counts.repeat_interleave(cycles)                             # segments class-major
    seg_first = torch.cumsum(seg_len, 0) - seg_len
    class_first_seg = torch.cumsum(cycles, 0) - cycles
    n_seg = int(seg_len.numel())
    seg_of = torch.arange(n_seg).repeat_interleave(seg_len)
    n_keys = int(seg_len.sum())
    item = torch.arange(n_keys) - seg_first[seg_of]                       # position inside the class
    cmax = int(cycles.max())
    seg_idx = (class_first_seg.unsqueeze(1) + torch.arange(cmax)).clamp(max=n_seg - 1)   # [K, cmax]
    plan = ClassAwarePlan(rounds=rounds, k=k, visits=visits, n_keys=n_keys, seg_off=seg_of.double() * 2,
                          item=item, seg_base=seg_first[seg_idx], pos=pos, n_c=ci.counts, start=ci.start,
                          order=ci.order, total=total)
    cache[total] = plan
    return plan


def class_aware_draw(plan: ClassAwarePlan, g: torch.Generator) -> torch.Tensor:
    """One class-aware epoch (flat sample indices [total]) from generator ``g``: the same draws
    and result as the sampler's definition in :mod:`ltcache.stage2.samplers`."""
    import torch

    class_seq = torch.argsort(torch.rand(plan.rounds, plan.k, generator=g), dim=1).reshape(-1)[:plan.visits]
    keys = torch.rand(plan.n_keys, generator=g, dtype=torch.float64) + plan.seg_off
    # non-negative doubles: the bit patterns as int64 sort in the values' order
    perm = plan.item[torch.argsort(keys.view(torch.int64))]               # per segment: a permutation
    cls = class_seq.unsqueeze(1)
    n_c = plan.n_c[cls]
    picked = perm[plan.seg_base[cls, plan.pos // n_c] + plan.pos % n_c]
    return plan.order[plan.start[cls] + picked].reshape(-1)[:plan.total]


def sample_weights(ci, kind: str, lam: float) -> torch.Tensor:
    """Per-sample weights [N] float32 of a weighted sampler (``sqrt``; ``progressive`` at
    weight ``lam`` on the class-balanced distribution), cached on ``ci``."""
    cache = ci.__dict__.setdefault("_weights", {})
    key = (kind, float(lam) if kind == "progressive" else 0.0)
    if key not in cache:
        counts = ci.counts.double()
        if kind == "sqrt":
            p_class = counts.sqrt()
        else:
            t = key[1]
            p_class = (1 - t) * counts / counts.sum() + t / len(counts) * (counts > 0).double()
        cache[key] = (p_class / counts.clamp_min(1))[ci.labels].float()
    return cache[key]
