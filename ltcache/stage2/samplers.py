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

Each sampler is an entry of the :data:`SAMPLERS` registry (its draw function, its default step
rule and the size of its epoch); a sampler of your own is one :func:`register_sampler` function
in a ``--plugin`` file, cut into batches by the same step rules (its draws are checked: dtype,
length, range). The registry loads without torch (``ltcache methods``, ``--help``): the draws
import it when they run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

from ltcache.errors import LtcacheError
from ltcache.registry import Registry, check_name, origin_of, track
from ltcache.stage2.prepare import CB_PER_CLASS, class_aware_draw, class_aware_plan, sample_weights  # noqa: F401

if TYPE_CHECKING:
    import torch

STEP_RULES = ("floor", "ceil", "ceil+1")
DEFAULT_STEPS: dict = track({})          # sampler -> its step rule when the method sets none


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: ``draw(ci, total, epoch, epochs, g, lam) -> flat indices`` (at least
    ``total`` of them: the epoch's draws, cut into batches by the step rule) and ``samples(ci)``,
    the draws one epoch holds (None: N)."""

    name: str
    draw: Callable
    samples: Optional[Callable] = None


SAMPLERS: Registry = Registry("sampler", "a sampler of your own: @ltcache.register_sampler in a --plugin FILE")


def register_sampler(name: str, steps: str = "ceil", samples: Optional[Callable] = None) -> Callable:
    """Decorator registering a sampler under ``name``, for ``register_method(..., sampler=name)``.

    The function is ``draw(ci: ClassIndex, epoch, epochs, g) -> idx``: one epoch's draws of
    train indices, a 1-D ``torch.long`` tensor with values in ``0 .. N-1`` (``ci`` holds the
    labels ``ci.labels``, the class counts ``ci.counts`` and the indices sorted by class
    ``ci.order``; ``epoch`` is 0-based of ``epochs``). Draw random numbers only from ``g``, the
    member's own generator: a member then trains the same alone or in a sweep. The engine cuts
    the draws into batches by the method's step rule (``steps``: this sampler's default,
    ``floor`` / ``ceil`` / ``ceil+1``); an epoch holds ``samples(ci)`` draws (default N).
    """
    check_name(name, "sampler")
    if steps not in STEP_RULES:
        raise LtcacheError(f"sampler '{name}': unknown step rule '{steps}'; use one of {', '.join(STEP_RULES)}")

    def deco(fn):
        if not callable(fn):
            raise LtcacheError(f"@register_sampler('{name}') decorates a function draw(ci, epoch, epochs, g)")
        SAMPLERS.register(name, Sampler(name, lambda ci, total, epoch, epochs, g, lam: fn(ci, epoch, epochs, g),
                                        samples), origin_of(fn))
        DEFAULT_STEPS[name] = steps
        return fn

    return deco


@dataclass
class ClassIndex:
    """Training labels regrouped by class (computed once per sweep)."""

    labels: torch.Tensor      # [N] long (CPU)
    counts: torch.Tensor      # [K] long
    order: torch.Tensor       # [N] sample indices sorted by class
    start: torch.Tensor       # [K] first position of each class in ``order``

    @classmethod
    def from_labels(cls, labels: torch.Tensor, num_classes: int) -> "ClassIndex":
        import torch

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
    sampler = SAMPLERS.get(kind)
    return int(sampler.samples(ci)) if sampler.samples is not None else ci.n


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
    import torch

    s = math.ceil(flat.numel() / batch_size)
    pad = s * batch_size - flat.numel()
    valid = torch.ones(s * batch_size, dtype=torch.bool)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
        valid[-pad:] = False
    return flat.view(s, batch_size), valid.view(s, batch_size)


def _class_aware(ci: ClassIndex, total: int, g: torch.Generator) -> torch.Tensor:
    """Classes round-robin over a class list reshuffled per round (one ``rand`` [rounds, K]
    argsorted per row), CB_PER_CLASS consecutive items of a per-class permutation per visit.
    A class of n_c images needs ceil(4 rounds / n_c) cycles, one random permutation each; all
    of them come from ONE sort of random keys offset by their segment number (``rand`` +
    2 segment), so the work is ~N + total, not cycles x N. The draw-independent layout is
    made once per sweep (:mod:`ltcache.stage2.prepare`)."""
    return class_aware_draw(class_aware_plan(ci, total), g)


def epoch_indices(kind: str, ci: ClassIndex, batch_size: int, epoch: int, epochs: int,
                  g: torch.Generator, steps: Union[str, int] = "",
                  lam: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches of one epoch: ``(idx [S, B], valid [S, B])``; ``steps``: the step rule
    (module docstring) or a number of batches; ``lam``: the progressive sampler's weight
    (default :func:`progressive_lambda`). A plugin sampler's draws are checked."""
    sampler = SAMPLERS.get(kind)
    total = epoch_total(kind, ci, batch_size, steps)
    flat = sampler.draw(ci, total, epoch, epochs, g, lam)
    if SAMPLERS.origin(kind) != "built-in":
        flat = check_draws(kind, flat, ci.n, total)
    return _batches(flat[:total], batch_size)


def check_draws(kind: str, flat, n: int, total: int) -> torch.Tensor:
    """A plugin sampler's draws, or a one-line error naming the sampler and the fix."""
    import torch

    where = f"sampler '{kind}' ({SAMPLERS.origin(kind)})"
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.long:
        raise LtcacheError(f"{where} returned {getattr(flat, 'dtype', type(flat).__name__)} indices; return a "
                           "1-D torch.long tensor (e.g. idx.long())")
    if flat.dim() != 1 or flat.numel() < total:
        raise LtcacheError(f"{where} returned indices of shape {list(flat.shape)}; return a 1-D tensor of at least "
                           f"{total} draws (the epoch's batches), or declare samples= in register_sampler")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
        bad = int(flat.min()) if int(flat.min()) < 0 else int(flat.max())
        raise LtcacheError(f"{where} returned index {bad} outside 0..{n - 1}; draw indices of the training set "
                           "(e.g. from ci.order)")
    return flat.cpu()


def _by_class(kind: str, lam: float, ci: ClassIndex, g: torch.Generator) -> torch.Tensor:
    """N draws with replacement, class j with probability ~ p_class[j] of sampler ``kind`` at
    weight ``lam`` (:func:`ltcache.stage2.prepare.sample_weights`, made once per sweep), uniform
    inside a class."""
    import torch

    return torch.multinomial(sample_weights(ci, kind, lam), ci.n, replacement=True, generator=g)


def _ib(ci: ClassIndex, total: int, epoch: int, epochs: int, g: torch.Generator, lam=None) -> torch.Tensor:
    import torch

    return torch.randperm(ci.n, generator=g)[:total]


def _cb(ci: ClassIndex, total: int, epoch: int, epochs: int, g: torch.Generator, lam=None) -> torch.Tensor:
    return _class_aware(ci, total, g)


def _sqrt(ci: ClassIndex, total: int, epoch: int, epochs: int, g: torch.Generator, lam=None) -> torch.Tensor:
    return _by_class("sqrt", 0.0, ci, g)


def _progressive(ci: ClassIndex, total: int, epoch: int, epochs: int, g: torch.Generator,
                 lam: Optional[float] = None) -> torch.Tensor:
    return _by_class("progressive", progressive_lambda(epoch, epochs) if lam is None else float(lam), ci, g)


for _s, _rule in ((Sampler("ib", _ib), "ceil"),
                  (Sampler("cb", _cb, lambda ci: int(ci.counts.max()) * len(ci.counts)), "floor"),
                  (Sampler("sqrt", _sqrt), "ceil"), (Sampler("progressive", _progressive), "ceil")):
    SAMPLERS.register(_s.name, _s, "built-in")
    DEFAULT_STEPS[_s.name] = _rule
