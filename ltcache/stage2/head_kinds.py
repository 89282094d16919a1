"""The head registry: which heads exist and how each maps onto a family (no torch).

``ltcache.stage2.heads`` computes with them (and re-exports everything here); this part is
what a method's registration checks its ``head`` against, so the method registry
(``ltcache methods``, ``--help``) loads without torch. :func:`register_head` adds a head
family of your own.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from ltcache.errors import LtcacheError
from ltcache.registry import Registry, check_name, origin_of

AFFINE_PARAMS = ("W", "b", "s", "c")
COSINE_PARAMS = ("W",)


@dataclass(frozen=True)
class HeadKind:
    """How a named head maps onto a family: which parameters train and at what lr factor."""

    name: str
    family: str              # "affine" | "cosine"
    trained: tuple           # parameter names trained
    slow: tuple = ()         # parameters trained at lr * lr_factor (MiSLAS W, b)
    uses_base_norm: bool = False
    plugin: Optional["PluginHead"] = None     # a registered head family of its own (family == name)


@dataclass(frozen=True)
class PluginHead:
    """The functions of a head family registered with :func:`register_head` (see there)."""

    params: tuple                       # parameter names, all trained
    init: Callable                      # (w0 [K, D], b0 [K], g, init) -> (params, buffers) of ONE member
    forward: Callable                   # (p, buf, x [M, B, D]) -> z [M, B, K]
    backward: Optional[Callable]        # (p, buf, x, dz [M, B, K]) -> {name: grad [M, ...]}; None: autograd


HEADS: Registry = Registry("head", "a head of your own: @ltcache.register_head in a --plugin FILE")
for _kind in (HeadKind("linear", "affine", ("W", "b")),
              HeadKind("lws", "affine", ("s",)),
              HeadKind("mislas", "affine", ("W", "b", "s"), slow=("W", "b")),
              HeadKind("marc", "affine", ("s", "c"), uses_base_norm=True),
              HeadKind("cosine", "cosine", ("W",))):
    HEADS.register(_kind.name, _kind, "built-in")


def get_head(name: str) -> HeadKind:
    """The :class:`HeadKind` called ``name``."""
    return HEADS.get(name)


def param_names(family: str) -> tuple:
    """Parameter names of a family."""
    if family == "affine":
        return AFFINE_PARAMS
    if family == "cosine":
        return COSINE_PARAMS
    return HEADS.get(family).plugin.params


def register_head(name: str) -> Callable:
    """Decorator registering a head family of your own under ``name`` (a class, instantiated
    once with no arguments), for ``register_method(..., head=name)``.

    The class gives, all on M stacked members (parameters ``p[name]`` are ``[M, ...]``):

    * ``params``: the names of its parameters (all trained, by the engine's SGD-momentum with
      the member's lr and weight decay);
    * ``init(self, w0, b0, g, init) -> (params, buffers)``: ONE member's initial tensors, from
      the stage-1 layer ``w0 [K, D]``, ``b0 [K]``, the member's ``torch.Generator`` ``g``
      (draw random numbers only from it: a member then trains the same alone or in a sweep)
      and the method's ``init`` (``stage1`` or ``fresh``);
    * ``forward(self, p, buf, x) -> z``: logits ``[M, B, K]`` of features ``x [M, B, D]``,
      differentiable PyTorch;
    * optionally ``backward(self, p, buf, x, dz) -> {name: grad}``: the parameters' gradients
      given dL/dz ``[M, B, K]``. Without it the engine takes them by autograd through
      ``forward`` (one call per step for the whole group).

    A trained member is deployed and evaluated through the same ``forward`` (M = 1).
    """
    check_name(name, "head")

    def deco(cls):
        if not inspect.isclass(cls):
            raise LtcacheError(f"@register_head('{name}') decorates a class with params, init and forward")
        HEADS.check_free(name)
        inst = cls()
        params = tuple(getattr(inst, "params", ()) or ())
        missing = [a for a in ("init", "forward") if not callable(getattr(inst, a, None))]
        if missing or not params or not all(isinstance(a, str) for a in params):
            what = ", ".join(missing) or "params (a tuple of parameter names)"
            raise LtcacheError(f"head '{name}' ({origin_of(cls)}) has no {what}; give params, init(w0, b0, g, init) "
                               "and forward(p, buf, x)")
        backward = getattr(inst, "backward", None)
        plugin = PluginHead(params, inst.init, inst.forward, backward if callable(backward) else None)
        HEADS.register(name, HeadKind(name, name, params, plugin=plugin), origin_of(cls))
        return cls

    return deco
