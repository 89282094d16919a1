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
* ``progressive`` cRT ``ClassPrioritySampler`` (linear shifting): p_j = (1 - lam) n_j/N + lam/K
           with lam = ``linspace(0, 1, E)[e]`` at 0-based epoch e of E (instance-balanced in the
           first epoch, class-balanced in the last), with replacement, N draws.

How many batches an epoch has is the method's **step rule** (``STEP_RULES``), as its source's
loop has it: ``floor`` = int(N/B) full batches (cRT, BALMS and BagofTricks break at
``epoch_steps = int(N/B)`` / ``drop_last=True``), ``ceil`` = ceil(N/B), the last one short
(``drop_last=False``), ``ceil+1`` = ceil(N/B) + 1 (MiSLAS: ``if i > end_steps: break``). The
batches are cut from the sampler's epoch (N draws; for ``cb`` its ``n_max K``), never beyond it.
Unset, a sampler's rule is ``DEFAULT_STEPS``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ltcache.errors import LtcacheError

SAMPLERS = ("ib", "cb", "sqrt", "progressive")
CB_PER_CLASS = 4
STEP_RULES = ("floor", "ceil", "ceil+1")
DEFAULT_STEPS = {"ib": "ceil", "cb": "floor", "sqrt": "ceil", "progressive": "ceil"}


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


def epoch_samples(kind: str, ci: "ClassIndex") -> int:
    """How many draws one epoch of sampler ``kind`` holds before a step rule cuts it: N, or
    n_max K for the class-aware sampler (cRT / MiSLAS ``ClassAwareSampler.__len__``)."""
    if kind == "cb":
        return int(ci.counts.max()) * len(ci.counts)
    return ci.n


def steps_per_epoch(kind: str, n: int, batch_size: int, rule: str = "", samples: int = 0) -> int:
    """Number of batches in one epoch of sampler ``kind`` under step ``rule`` (see the module
    docstring; "" = the sampler's default) for N = ``n`` images; ``samples``: the sampler's epoch
    (:func:`epoch_samples`, 0 = N), which no rule reads beyond."""
    rule = rule or DEFAULT_STEPS.get(kind, "ceil")
    if rule == "floor":
        s = n // batch_size
    elif rule == "ceil":
        s = math.ceil(n / batch_size)
    elif rule == "ceil+1":
        s = math.ceil(n / batch_size) + 1
    else:
        raise LtcacheError(f"unknown step rule '{rule}'; use one of {', '.join(STEP_RULES)}")
    cap = math.ceil(max(samples or n, batch_size if kind == "cb" else 0) / batch_size)
    return max(1, min(s, cap))


def epoch_total(kind: str, ci: "ClassIndex", batch_size: int, rule: Union[str, int] = "") -> int:
    """Draws used by one epoch: its batches (:func:`steps_per_epoch` of step rule ``rule``, or
    ``rule`` batches when it is a number) x B, cut at the sampler's epoch."""
    samples = max(epoch_samples(kind, ci), batch_size if kind == "cb" else 0)
    s = rule if isinstance(rule, int) else steps_per_epoch(kind, ci.n, batch_size, rule, samples)
    return min(s * batch_size, samples)


def progressive_lambda(epoch: int, epochs: int) -> float:
    """The progressive sampler's weight on the class-balanced distribution at 0-based ``epoch``:
    ``np.linspace(0, 1, epochs)[epoch]`` (cRT ``ClassPrioritySampler``: 0 in the first epoch,
    1 in the last)."""
    return epoch / (epochs - 1) if epochs > 1 else 0.0


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
                  g: torch.Generator, steps: Union[str, int] = "",
                  lam: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches of one epoch: ``(idx [S, B], valid [S, B])``; ``steps``: the step rule
    (module docstring) or a number of batches; ``lam``: the progressive sampler's weight
    (default :func:`progressive_lambda`)."""
    n = ci.n
    total = epoch_total(kind, ci, batch_size, steps)
    if kind == "ib":
        return _batches(torch.randperm(n, generator=g)[:total], batch_size)
    if kind == "cb":
        return _batches(_class_aware(ci, total, g), batch_size)
    counts = ci.counts.double()
    if kind == "sqrt":
        p_class = counts.sqrt()
    elif kind == "progressive":
        t = progressive_lambda(epoch, epochs) if lam is None else float(lam)
        p_class = (1 - t) * counts / counts.sum() + t / len(counts) * (counts > 0).double()
    else:
        raise LtcacheError(f"unknown sampler '{kind}'; use one of {', '.join(SAMPLERS)}")
    w = (p_class / counts.clamp_min(1))[ci.labels]
    flat = torch.multinomial(w.float(), n, replacement=True, generator=g)
    return _batches(flat[:total], batch_size)
