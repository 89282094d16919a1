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

Each is an entry of the :data:`SAMPLERS` registry; a sampler of your own is one
:func:`register_sampler` function in a ``--plugin`` file (its batches are checked: dtype,
shape, range).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ltcache.errors import LtcacheError
from ltcache.registry import Registry, check_name, origin_of

CB_PER_CLASS = 4


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: ``draw(ci, batch_size, epoch, epochs, g) -> idx [S, B]`` or
    ``(idx, valid)``, and its number of batches per epoch ``steps(n, batch_size)``."""

    name: str
    draw: Callable
    steps: Callable[[int, int], int]


SAMPLERS: Registry = Registry("sampler", "a sampler of your own: @ltcache.register_sampler in a --plugin FILE")


def register_sampler(name: str, steps: Optional[Callable[[int, int], int]] = None) -> Callable:
    """Decorator registering a sampler under ``name``, for ``register_method(..., sampler=name)``.

    The function is ``draw(ci: ClassIndex, batch_size, epoch, epochs, g) -> idx`` (or ``(idx,
    valid)``): one epoch's batches of train indices, a long tensor ``[S, B]`` with values in
    ``0 .. N-1`` (``valid [S, B]`` bool marks padding; default all valid). ``ci`` holds the
    labels, class counts and the indices sorted by class; draw random numbers only from ``g``
    (the member's own generator: a member then trains the same alone or in a sweep).
    ``steps(n, batch_size)``: S (default ``ceil(n / batch_size)``), which the engine needs
    before drawing.
    """
    check_name(name, "sampler")

    def deco(fn):
        if not callable(fn):
            raise LtcacheError(f"@register_sampler('{name}') decorates a function draw(ci, batch_size, epoch, epochs, g)")
        SAMPLERS.register(name, Sampler(name, fn, steps or _ceil_steps), origin_of(fn))
        return fn

    return deco


def _ceil_steps(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


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
    return int(SAMPLERS.get(kind).steps(n, batch_size))


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
    """The batches of one epoch: ``(idx [S, B], valid [S, B])``; a plugin's checked."""
    sampler = SAMPLERS.get(kind)
    out = sampler.draw(ci, batch_size, epoch, epochs, g)
    if SAMPLERS.origin(kind) == "built-in":
        return out
    return check_batches(kind, out, ci.n, batch_size, sampler.steps(ci.n, batch_size))


def check_batches(kind: str, out, n: int, batch_size: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sampler's result as (idx, valid), or a one-line error naming the sampler and the fix."""
    where = f"sampler '{kind}' ({SAMPLERS.origin(kind)})"
    idx, valid = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long:
        raise LtcacheError(f"{where} returned {getattr(idx, 'dtype', type(idx).__name__)} indices; return a "
                           "torch.long tensor [S, B] (e.g. idx.long())")
    if tuple(idx.shape) != (steps, batch_size):
        raise LtcacheError(f"{where} returned indices of shape {list(idx.shape)}, not [S, B] = [{steps}, {batch_size}]; "
                           "return steps(n, batch_size) batches of batch_size, or declare steps=")
    if valid is None:
        valid = torch.ones(idx.shape, dtype=torch.bool)
    elif not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != idx.shape:
        raise LtcacheError(f"{where} returned a valid mask that is not a bool tensor of its indices' shape; fix it")
    live = idx[valid]
    if live.numel() and (int(live.min()) < 0 or int(live.max()) >= n):
        raise LtcacheError(f"{where} returned index {int(live.min()) if int(live.min()) < 0 else int(live.max())} "
                           f"outside 0..{n - 1}; draw indices of the training set (e.g. from ci.order)")
    return idx.cpu(), valid.cpu()


def _ib(ci: ClassIndex, batch_size: int, epoch: int, epochs: int, g: torch.Generator):
    return _batches(torch.randperm(ci.n, generator=g), batch_size)


def _cb(ci: ClassIndex, batch_size: int, epoch: int, epochs: int, g: torch.Generator):
    s = max(1, ci.n // batch_size)
    flat = _class_aware(ci, s * batch_size, g)
    return flat.view(s, batch_size), torch.ones(s, batch_size, dtype=torch.bool)


def _by_class(p_class: torch.Tensor, ci: ClassIndex, batch_size: int, g: torch.Generator):
    """N draws with replacement, class j with probability ~ p_class[j], uniform inside a class."""
    w = (p_class / ci.counts.double().clamp_min(1))[ci.labels]
    return _batches(torch.multinomial(w.float(), ci.n, replacement=True, generator=g), batch_size)


def _sqrt(ci: ClassIndex, batch_size: int, epoch: int, epochs: int, g: torch.Generator):
    return _by_class(ci.counts.double().sqrt(), ci, batch_size, g)


def _progressive(ci: ClassIndex, batch_size: int, epoch: int, epochs: int, g: torch.Generator):
    counts = ci.counts.double()
    t = epoch / max(1, epochs)
    return _by_class((1 - t) * counts / counts.sum() + t / len(counts) * (counts > 0).double(), ci, batch_size, g)


for _s in (Sampler("ib", _ib, _ceil_steps), Sampler("cb", _cb, lambda n, b: max(1, n // b)),
           Sampler("sqrt", _sqrt, _ceil_steps), Sampler("progressive", _progressive, _ceil_steps)):
    SAMPLERS.register(_s.name, _s, "built-in")
