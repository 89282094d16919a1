"""The feature cache: the contract between stage 1 and stage 2 (see docs/ARCHITECTURE.md)."""
from ltcache.cache.build import write_cache
from ltcache.cache.load import FeatureCache, SplitFeatures, default_cache_path, load

__all__ = ["FeatureCache", "SplitFeatures", "default_cache_path", "load", "write_cache", "extract", "describe"]


def extract(*args, **kwargs):
    """Run the frozen backbone over every split into a cache (see :mod:`ltcache.cache.extraction`)."""
    from ltcache.cache.extraction import extract as _extract
    return _extract(*args, **kwargs)


def describe(path) -> str:
    """A readable summary of a cache (``ltcache info``)."""
    from ltcache.cache.info import describe as _describe
    return _describe(path)
