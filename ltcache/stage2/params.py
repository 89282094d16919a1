"""Hyper-parameter declarations: the one source of every stage-2 hyper-parameter.

Each hyper-parameter is declared once, as a :class:`Param` (name, type, range or choices,
default, help): the generic ones here (:data:`GENERIC_PARAMS`), each loss's own ones on its
loss unit (``ltcache/stage2/losses/*.py``), and the few that belong to a head or a closed form
on the method (``register_method(params=...)``). The range checks, the ``retrain`` options, the
pipeline ``[sweep]`` keys and ``ltcache methods`` all read these declarations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ltcache.errors import LtcacheError
from ltcache.options import MAX_BATCH_SIZE, MAX_EPOCHS


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: ``Param("delta", float, lo=0, hi=1, default=0.98, help="...")``.

    ``lo`` / ``hi`` bound a number (``None``: unbounded; ``lo_open`` / ``hi_open`` exclude the
    bound); ``choices`` lists the values of a string parameter.
    """

    name: str
    type: type = float
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    default: Any = None
    help: str = ""
    space: Optional[str] = None       # search range for `ltcache tune`: "LOW:HIGH", "log:LOW:HIGH" or "a,b,c"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise LtcacheError(f"hyper-parameter name {self.name!r} is not a Python identifier; "
                               "use letters, digits and _ (e.g. 'epsilon')")
        if self.type not in (float, int, str):
            raise LtcacheError(f"hyper-parameter {self.name}: type must be float, int or str, "
                               f"got {getattr(self.type, '__name__', self.type)}")
        object.__setattr__(self, "choices", tuple(self.choices))

    def range_text(self) -> str:
        """``[0, 1]``, ``(0, inf)`` or ``{a, b}``: what :meth:`check` accepts."""
        if self.choices:
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        num = (lambda v: str(int(v))) if self.type is int else (lambda v: f"{v:g}")
        lo = "-inf" if self.lo is None else num(self.lo)
        hi = "inf" if self.hi is None else num(self.hi)
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def accepts(self, v) -> bool:
        """Whether the converted value ``v`` is in range (or one of the choices)."""
        if self.choices:
            return v in self.choices
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def check(self, value):
        """``value`` converted to the declared type and range-checked (LtcacheError naming the fix)."""
        desc = self.help or self.name
        typ = self.type
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if typ is int and isinstance(value, str):
                v = int(float(value)) if float(value).is_integer() else None
                if v is None:
                    raise ValueError
            else:
                v = typ(value)
        except (TypeError, ValueError):
            raise LtcacheError(f"{self.name} ({desc}) must be a {typ.__name__}, got '{value}'") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise LtcacheError(f"{self.name} ({desc}) must be finite, got {v}")
        if not self.accepts(v):
            raise LtcacheError(f"{self.name} ({desc}) must be in {self.range_text()}, got {v}")
        return v


SCHEDULES = ("cosine", "cosine-start", "constant")


GENERIC_PARAMS: tuple[Param, ...] = (
    Param("epochs", int, lo=1, hi=MAX_EPOCHS, help="epochs"),
    Param("lr", float, lo=0, help="learning rate"),
    Param("batch_size", int, lo=1, hi=MAX_BATCH_SIZE, help="batch size"),
    Param("wd", float, lo=0, help="weight decay"),
    Param("schedule", str, choices=SCHEDULES, help="lr schedule"),
    Param("momentum", float, lo=0, hi=1, hi_open=True, help="SGD momentum"),
)
GENERIC = tuple(p.name for p in GENERIC_PARAMS)

# option names of the stage-2 commands and pipeline [sweep] / [tune] keys: no hyper-parameter may take them
# (tests/test_options.py checks that every one of them is here)
RESERVED = frozenset({
    "method", "methods", "all_methods", "seeds", "tune_seeds", "select", "select_metric", "test_views", "device",
    "preset", "jobs", "quiet", "clean_view", "from_tune", "cache", "cache_dir", "out", "export", "export_path",
    "force", "grid", "plugin", "plugins", "budget", "search", "through_backbone", "ckpt", "data_root",
    "no_augment", "eval_bn", "help", "iterations", "name", "notes", "precision", "threads", "against", "strict",
    "caches", "space", "main_features",
})
