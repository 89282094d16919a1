"""Stage 2: re-train classifier heads on cached features, many configurations at once.

Never imports ``ltcache.data``, ``ltcache.models`` or torchvision: it only sees a cache.
``retrain``, ``bench``, ``METHODS`` and ``get_method`` are imported on first use, so that the
registry (``ltcache.stage2.methods``: ``ltcache methods``, ``--help``) loads without torch.
"""
from __future__ import annotations

__all__ = ["retrain", "bench", "METHODS", "get_method"]

_LAZY = {"retrain": "ltcache.stage2.api", "bench": "ltcache.stage2.api",
         "METHODS": "ltcache.stage2.methods", "get_method": "ltcache.stage2.methods"}


def __getattr__(name: str):
    """``ltcache.stage2.bench`` and the rest of ``__all__``, imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ltcache.stage2' has no attribute '{name}'")
