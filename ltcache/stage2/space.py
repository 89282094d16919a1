"""Hyper-parameter search spaces, as data: one :class:`Dim` per tunable hyper-parameter.

Each method in the registry declares the dimensions of its own hyper-parameters
(:attr:`ltcache.stage2.methods.Method.space`); the generic ones (lr, wd, epochs) are added to
every trained method by :func:`method_space`. A dimension knows its range, its scale (log /
linear / int / choice) and where the range comes from. :func:`draw` turns a space into
``budget`` points by a grid, random draws or a scrambled Sobol sequence (torch's
``SobolEngine``), always the same points for the same seed.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ltcache.errors import LtcacheError
from ltcache.options import SEARCHES

SCALES = ("log", "linear", "int", "choice")


@dataclass(frozen=True)
class Dim:
    """One hyper-parameter's search range: ``[low, high]`` on a log / linear / int scale, or a
    list of ``choices``; ``source`` says where the range comes from."""

    name: str
    scale: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple = ()
    source: str = ""

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale}")
        if self.scale == "choice" and not self.choices:
            raise ValueError(f"{self.name}: a choice dimension needs choices")
        if self.scale != "choice" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"{self.name}: needs low <= high")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(f"{self.name}: a log scale needs low > 0")

    def at(self, u: float):
        """The value at quantile ``u`` in [0, 1] of this dimension."""
        u = min(max(float(u), 0.0), 1.0)
        if self.scale == "choice":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.scale == "log":
            v = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
            return float(f"{v:.3g}")
        if self.scale == "int":
            return int(min(self.high, math.floor(self.low + u * (self.high - self.low + 1))))
        return float(f"{self.low + u * (self.high - self.low):.3g}")

    def levels(self, n: int) -> list:
        """``n`` evenly spread values (all choices for a choice dimension when n >= their count)."""
        if self.scale == "choice":
            if n >= len(self.choices):
                return list(self.choices)
            return [self.choices[round(i * (len(self.choices) - 1) / max(1, n - 1))] for i in range(n)]
        if n == 1:
            return [self.at(0.5)]
        out = []
        for i in range(n):
            v = self.at(i / (n - 1))
            if v not in out:
                out.append(v)
        return out

    def describe(self) -> str:
        """``log [5e-05, 0.005]`` / ``choice {10, 20, 30}``."""
        if self.scale == "choice":
            return "choice {" + ", ".join(str(c) for c in self.choices) + "}"
        return f"{self.scale} [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Space:
    """A method's search space: its dimensions (empty: nothing to tune) and, for a closed
    form, the candidate values its parameter is tried at (``candidates``)."""

    dims: tuple = ()
    candidates: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]


def draw(space: Space, budget: int, search: str = "sobol", seed: int = 0) -> list[dict]:
    """Up to ``budget`` distinct points of ``space`` (a closed form: its candidates, at most
    ``budget`` of them, evenly spread). Same arguments, same points."""
    if budget < 1:
        raise LtcacheError(f"--budget must be >= 1 (got {budget})")
    if search not in SEARCHES:
        raise LtcacheError(f"unknown --search '{search}'; use one of: {', '.join(SEARCHES)}")
    if space.candidates:
        (name, values), = space.candidates.items()
        values = list(values)
        if len(values) > budget:
            values = [values[round(i * (len(values) - 1) / max(1, budget - 1))] for i in range(budget)]
        return [{name: v} for v in dict.fromkeys(values)]
    dims = space.dims
    if not dims:
        return [{}]
    if search == "grid":
        pts = _grid(dims, budget)
    else:
        import torch                     # only to draw: a space is data (``ltcache methods --space``)

        if search == "sobol":
            u = torch.quasirandom.SobolEngine(len(dims), scramble=True, seed=seed).draw(budget).double()
        else:
            u = torch.rand(budget, len(dims), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        pts = [{d.name: d.at(float(u[i, j])) for j, d in enumerate(dims)} for i in range(budget)]
    out, seen = [], set()
    for p in pts:
        key = tuple(sorted(p.items()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _grid(dims: Sequence[Dim], budget: int) -> list[dict]:
    """A Cartesian grid of at most ``budget`` points: levels per dimension grown one at a time
    (choice dimensions capped at their count) while the product stays within the budget."""
    n = [1] * len(dims)
    cap = [len(d.choices) if d.scale == "choice" else budget for d in dims]
    grew = True
    while grew:
        grew = False
        for i in range(len(dims)):
            if n[i] < cap[i] and math.prod(n) // n[i] * (n[i] + 1) <= budget:
                n[i] += 1
                grew = True
    levels = [d.levels(k) for d, k in zip(dims, n)]
    return [dict(zip([d.name for d in dims], combo)) for combo in itertools.product(*levels)]


def parse_dim(name: str, spec: str, check, source: str) -> Dim:
    """One dimension from ``LOW:HIGH`` (linear; int when the values are ints), ``log:LOW:HIGH`` or
    ``a,b,c`` (a choice); ``check`` converts and range-checks each value. ValueError when malformed."""
    if ":" in spec:
        parts = spec.split(":")
        scale = "log" if parts[0] == "log" else "linear"
        lo, hi = (parts[1:] if scale == "log" else parts)
        lo, hi = check(lo), check(hi)
        return Dim(name, "int" if isinstance(lo, int) else scale, lo, hi, source=source)
    values = tuple(check(v.strip()) for v in spec.split(",") if v.strip())
    return Dim(name, "choice", choices=values, source=source)


def param_dim(p) -> Optional[Dim]:
    """The search dimension a hyper-parameter declaration implies: its ``space`` when it declares one,
    else a default from its choices, bounds and default (a closed range linear; a positive default a
    decade either side on a log scale); None when nothing sensible follows (an unbounded, defaultless
    number)."""
    if p.space:
        try:
            return parse_dim(p.name, p.space, p.check, "declared by its Param (space=...)")
        except ValueError:
            from ltcache.errors import LtcacheError
            raise LtcacheError(f"hyper-parameter {p.name}: space={p.space!r} must be LOW:HIGH, log:LOW:HIGH or "
                               "a,b,c with LOW <= HIGH") from None
    src = "default from its Param (no space declared)"
    if p.choices:
        return Dim(p.name, "choice", choices=tuple(p.choices), source=src)
    if p.lo is not None and p.hi is not None:
        lo, hi = float(p.lo), float(p.hi)
        pad = (hi - lo) * 0.01
        lo, hi = lo + pad * p.lo_open, hi - pad * p.hi_open
        if p.type is int:
            return Dim(p.name, "int", int(math.ceil(lo)), int(math.floor(hi)), source=src)
        return Dim(p.name, "linear", lo, hi, source=src)
    d = p.default
    if isinstance(d, (int, float)) and d > 0 and p.type is float:
        lo, hi = d / 10, d * 10
        if p.lo is not None:
            lo = max(lo, float(p.lo))
        if p.hi is not None:
            hi = min(hi, float(p.hi))
        if lo > 0 and lo < hi:
            return Dim(p.name, "log", lo, hi, source=src + ": a decade either side of its default")
    return None
