"""Index samplers for one epoch, as whole tensors (no per-sample Python).

Each function returns ``(idx [S, B] long, valid [S, B] bool)``: the S batches of one epoch
of one configuration, drawn with that configuration's own ``torch.Generator`` so that a
configuration trained inside a sweep sees exactly the indices it would see alone.

* ``ib``   instance-balanced: a permutation per epoch, ceil(N/B) batches, the last one short
           (PyTorch ``DataLoader(shuffle=True, drop_last=False)``).
* ``cb``   cRT ``ClassAwareSampler`` with 4 images per class visit: classes round-robin over
           a class list reshuffled at each wrap; inside a class, consecutive items of a
           cycling per-class permutation (reshuffled at each wrap). cRT caps the epoch at
           int(N/B) full batches (docs/methods.md#class-aware-sampler-cb). Deviation, named: the class and
           per-class streams restart at each epoch instead of continuing across epochs
           (the same distribution: exact class balance, no repeat inside a class cycle).
* ``sqrt`` square-root sampling: P(class j) ~ n_j^(1/2), image uniform in the class, with
           replacement, N draws (ceil(N/B) batches).
* ``progressive`` cRT/BoT progressively balanced: p_j(t) = (1 - t/T) n_j/N + (t/T)/K at
           epoch t of T, with replacement, N draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ltcache.errors import LtcacheError

SAMPLERS = ("ib", "cb", "sqrt", "progressive")
CB_PER_CLASS = 4


@dataclass
class ClassIndex:
    """Training labels regrouped by class (computed once per sweep)."""

    labels: torch.Tensor      # [N] long (CPU)
    counts: torch.Tensor      # [K] long
    order: torch.Tensor       # [N] sample indices sorted by class
    start: torch.Tensor       # [K] first position of each class in ``order``

    @classmethod
    def from_labels(cls, labels: torch.Tensor, num_classes: int) -> "ClassIndex":
        labels = labels.long().cpu()
        counts = torch.bincount(labels, minlength=num_classes)
        order = torch.argsort(labels, stable=True)
        start = torch.cumsum(counts, 0) - counts
        return cls(labels, counts, order, start)

    @property
    def n(self) -> int:
        return int(self.labels.numel())


def steps_per_epoch(kind: str, n: int, batch_size: int) -> int:
    """Number of batches in one epoch of sampler ``kind``."""
    if kind == "cb":
        return max(1, n // batch_size)
    return math.ceil(n / batch_size)


def _batches(flat: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = math.ceil(flat.numel() / batch_size)
    pad = s * batch_size - flat.numel()
    valid = torch.ones(s * batch_size, dtype=torch.bool)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
        valid[-pad:] = False
    return flat.view(s, batch_size), valid.view(s, batch_size)


def _class_aware(ci: ClassIndex, total: int, g: torch.Generator) -> torch.Tensor:
    k = len(ci.counts)
    visits = math.ceil(total / CB_PER_CLASS)
    rounds = math.ceil(visits / k)
    class_seq = torch.argsort(torch.rand(rounds, k, generator=g), dim=1).reshape(-1)[:visits]
    visit_no = torch.arange(visits) // k                       # each class once per round
    pos = (visit_no * CB_PER_CLASS).unsqueeze(1) + torch.arange(CB_PER_CLASS)   # [visits, 4]
    cls = class_seq.unsqueeze(1).expand_as(pos)
    n_c = ci.counts[cls]
    # one random permutation per (class, cycle through the class): a class of n_c images needs
    # ceil(4 rounds / n_c) cycles. All permutations come from ONE sort of random keys offset by
    # their segment number, so the work is ~N + total, not cycles x N.
    counts = ci.counts.clamp_min(1)
    cycles = (rounds * CB_PER_CLASS + counts - 1) // counts                # [K]
    seg_len = counts.repeat_interleave(cycles)                             # segments class-major
    seg_first = torch.cumsum(seg_len, 0) - seg_len
    class_first_seg = torch.cumsum(cycles, 0) - cycles
    n_seg = int(seg_len.numel())
    seg_of = torch.arange(n_seg).repeat_interleave(seg_len)
    item = torch.arange(int(seg_len.sum())) - seg_first[seg_of]           # position inside the class
    keys = torch.rand(int(seg_len.sum()), generator=g, dtype=torch.float64) + seg_of.double() * 2
    perm = item[torch.argsort(keys)]                                       # per segment: a permutation
    cyc = pos // n_c
    off = pos % n_c
    picked = perm[seg_first[class_first_seg[cls] + cyc] + off]
    return ci.order[ci.start[cls] + picked].reshape(-1)[:total]


def epoch_indices(kind: str, ci: ClassIndex, batch_size: int, epoch: int, epochs: int,
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches of one epoch: ``(idx [S, B], valid [S, B])``."""
    n = ci.n
    if kind == "ib":
        return _batches(torch.randperm(n, generator=g), batch_size)
    if kind == "cb":
        s = steps_per_epoch("cb", n, batch_size)
        flat = _class_aware(ci, s * batch_size, g)
        return flat.view(s, batch_size), torch.ones(s, batch_size, dtype=torch.bool)
    counts = ci.counts.double()
    if kind == "sqrt":
        p_class = counts.sqrt()
    elif kind == "progressive":
        t = epoch / max(1, epochs)
        p_class = (1 - t) * counts / counts.sum() + t / len(counts) * (counts > 0).double()
    else:
        raise LtcacheError(f"unknown sampler '{kind}'; use one of {', '.join(SAMPLERS)}")
    w = (p_class / counts.clamp_min(1))[ci.labels]
    flat = torch.multinomial(w.float(), n, replacement=True, generator=g)
    return _batches(flat, batch_size)
