"""ltcache: long-tailed recognition with a feature cache.

Stage 1 trains a backbone once; extraction caches its penultimate features; stage 2
re-trains many classifier heads on the cached tensors in one batched sweep.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path):
    """Load a classifier exported by ``ltcache retrain --export`` as a ready ``nn.Module``."""
    from ltcache.export import load_model as _load_model

    return _load_model(path)
