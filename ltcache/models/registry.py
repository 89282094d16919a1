"""Backbone registry: one decorator, one name (timm-style)."""
from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

from ltcache.errors import LtcacheError

_REGISTRY: dict[str, Callable[[int], nn.Module]] = {}


def register_model(name: str):
    """Register a constructor ``fn(num_classes) -> nn.Module`` under ``name``."""
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    """Registered backbone names."""
    return sorted(_REGISTRY)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised backbone with ``.features(x)``, ``.fc`` and ``.feature_dim``."""
    if arch not in _REGISTRY:
        close = difflib.get_close_matches(arch, list_models(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LtcacheError(f"unknown arch '{arch}'{hint}; valid: {', '.join(list_models())}")
    if num_classes < 1:
        raise LtcacheError(f"a model needs at least one class (got {num_classes})")
    return _REGISTRY[arch](num_classes)


def load_foreign_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load a plain state dict (e.g. torchvision's, possibly saved from DataParallel) into a
    registered backbone; a mismatch is a one-line error with the key counts."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        example = (missing or unexpected or bad_shape)[0]
        raise LtcacheError(
            f"the checkpoint does not fit this --arch: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(bad_shape)} wrongly shaped keys (e.g. '{example}'); check --arch "
            "and the number of classes")
    model.load_state_dict(sd)
