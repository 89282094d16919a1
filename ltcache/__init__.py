"""ltcache: long-tailed recognition with a feature cache.

Stage 1 trains a backbone once; extraction caches its penultimate features; stage 2
re-trains many classifier heads on the cached tensors in one batched sweep.

Methods of your own, in a file loaded with ``--plugin FILE`` (or ``ltcache.load_plugin``),
each a decorator or call of this package (README "Add a method"; ``examples/``):

* ``register_loss``: a loss composed of the fused family's parts (``LossSpec``, listed by
  ``composable()``: built-in speed), or a forward in plain PyTorch that may read the batch's
  features and the head's parameters (autograd, or its own ``grad``);
* ``register_head``, ``register_sampler``, ``register_posthoc``: a head family, an index
  sampler, a closed-form rule;
* ``register_method`` and ``Param``: the method (head + loss + sampler + presets + space).

``ltcache check-plugin FILE`` runs the common checks on every entry a file registers.
"""
from __future__ import annotations

import os as _os
import sys as _sys

from ltcache.version import __version__

# Under torchrun, a rank that ends is reported by ltcache in one line naming it; torch's C++ log would
# add its own error lines (gloo's "Rank 1 failed to pass monitoredBarrier ...") before it. Quiet them,
# unless the user chose a level (TORCH_CPP_LOG_LEVEL=INFO shows everything again). Read by torch when
# it is first imported, so only set here, before that.
if _os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") and "torch" not in _sys.modules:
    _os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

__all__ = ["__version__", "load_model", "register_method", "register_loss", "register_head", "register_sampler",
           "register_posthoc", "LossSpec", "composable", "Param", "Dim", "load_plugin"]

_LAZY = {
    "register_method": ("ltcache.stage2.methods", "register_method"),
    "register_loss": ("ltcache.stage2.losses", "register_loss"),
    "register_head": ("ltcache.stage2.head_kinds", "register_head"),
    "register_sampler": ("ltcache.stage2.samplers", "register_sampler"),
    "register_posthoc": ("ltcache.stage2.closed_form", "register_posthoc"),
    "LossSpec": ("ltcache.stage2.losses", "LossSpec"),
    "composable": ("ltcache.stage2.losses", "composable"),
    "Param": ("ltcache.stage2.params", "Param"),
    "Dim": ("ltcache.stage2.space", "Dim"),
    "load_plugin": ("ltcache.plugins", "load_plugin"),
}


def load_model(path: "str | os.PathLike", flip: "bool | None" = None) -> "torch.nn.Module":
    """Load a classifier exported by ``ltcache retrain --export`` as a ready ``nn.Module`` that
    takes raw images (PIL or uint8 tensors) through its stored preprocessing and test-time views
    (``flip``: average the flipped view too; default as stored). See ``ltcache.export``."""
    from ltcache.export import load_model as _load_model

    return _load_model(path, flip=flip)


def __getattr__(name: str):
    """The extension API, imported on first use (``import ltcache`` stays light)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ltcache' has no attribute '{name}'")
