"""Backbone registry: one decorator, one name (timm-style), plus ``torchvision:NAME`` for any
torchvision classification model (its last Linear is the classifier)."""
from __future__ import annotations

import torch.nn as nn

from ltcache.errors import LtcacheError, close_matches
from ltcache.registry import Registry, origin_of

_REGISTRY: Registry = Registry("backbone", "or torchvision:NAME / timm:NAME")
TORCHVISION = "torchvision:"
TIMM = "timm:"


def register_model(name: str):
    """Register a constructor ``fn(num_classes) -> nn.Module`` under ``name``."""
    def deco(fn):
        _REGISTRY.register(name, fn, origin_of(fn))
        return fn
    return deco


def list_models() -> list[str]:
    """Registered backbone names (``torchvision:NAME`` names are accepted besides these)."""
    return sorted(_REGISTRY)


def check_arch(arch: str) -> None:
    """Refuse an unknown backbone name (without building it), suggesting the closest names."""
    if not isinstance(arch, str) or not arch:
        raise LtcacheError(f"--arch must be a backbone name (got {arch!r}); e.g. resnet32 or torchvision:resnet18")
    if arch.startswith(TORCHVISION):
        from ltcache.models.torchvision_nets import check_torchvision
        check_torchvision(arch)
        return
    if arch.startswith(TIMM):
        from ltcache.models.timm_nets import check_timm
        check_timm(arch)
        return
    if arch not in _REGISTRY:
        close = close_matches(arch, list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LtcacheError(f"unknown arch '{arch}'{hint}; valid: {', '.join(list_models())}, or "
                           "torchvision:NAME for any torchvision classification model (e.g. torchvision:mobilenet_v3_small), or "
                           "timm:NAME (pip install -e '.[timm]' in the ltcache checkout)")


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised backbone with ``.features(x)``, ``.fc`` and ``.feature_dim``."""
    check_arch(arch)
    if num_classes < 1:
        raise LtcacheError(f"a model needs at least one class (got {num_classes})")
    if arch.startswith(TORCHVISION):
        from ltcache.models.torchvision_nets import build_torchvision
        return build_torchvision(arch, num_classes)
    if arch.startswith(TIMM):
        from ltcache.models.timm_nets import build_timm
        return build_timm(arch, num_classes)
    return _REGISTRY[arch](num_classes)


def _layout(model: nn.Module, state_dict: dict) -> dict:
    """``module.``-prefixes (DataParallel) dropped, then the model's own key mapping (a torchvision
    state dict for a ``torchvision:NAME`` model)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    mapper = getattr(model, "map_state_dict", None)
    return mapper(sd) if callable(mapper) else sd


def _refuse_mismatch(own: dict, sd: dict, what: str) -> None:
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        example = (missing or unexpected or bad_shape)[0]
        raise LtcacheError(
            f"{what} does not fit this --arch: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(bad_shape)} wrongly shaped keys (e.g. '{example}'); check --arch "
            "and the number of classes")


def load_foreign_state_dict(model: nn.Module, state_dict: dict, what: str = "the checkpoint") -> None:
    """Load a plain state dict (e.g. torchvision's, possibly saved from DataParallel) into a
    registered backbone; a mismatch is a one-line error with the key counts. The papers' own
    checkpoint layouts (LOS, MiSLAS, cRT, LDAM-DRW, BagofTricks-LT) are read into this form first
    by :func:`ltcache.models.layouts.resolve`."""
    sd = _layout(model, state_dict)
    _refuse_mismatch(model.state_dict(), sd, what)
    model.load_state_dict(sd)


def load_pretrained(model: nn.Module, state_dict: dict, what: str = "the --pretrained weights") -> bool:
    """Load backbone weights (e.g. torchvision's ImageNet ones, saved locally) into ``model``: every
    backbone key must fit; the classifier ``fc`` is taken too when its shape fits (the same
    classes), else it keeps its fresh initialisation. Returns True when the classifier was taken."""
    sd = _layout(model, state_dict)
    own = model.state_dict()
    head = [k for k in own if k.startswith("fc.")]
    kept = all(k in sd and tuple(sd[k].shape) == tuple(own[k].shape) for k in head)
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    _refuse_mismatch({k: v for k, v in own.items() if not k.startswith("fc.")}, body, what)
    if kept:
        body.update({k: sd[k] for k in head})
    model.load_state_dict(body, strict=kept)
    return kept
