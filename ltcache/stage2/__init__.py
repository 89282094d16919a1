"""Stage 2: re-train classifier heads on cached features, many configurations at once.

Never imports ``ltcache.data``, ``ltcache.models`` or torchvision: it only sees a cache.
"""
from ltcache.stage2.api import bench, retrain
from ltcache.stage2.methods import METHODS, get_method

__all__ = ["retrain", "bench", "METHODS", "get_method"]
