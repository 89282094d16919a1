"""Test helpers around the cache writer's ``write_shard``: the n-th write fails as a kill would,
or every write is recorded."""
from __future__ import annotations

from pathlib import Path

import ltcache.cache.build as cache_build


def fail_after(monkeypatch, n: int):
    """Let the first ``n`` shard writes through, then raise KeyboardInterrupt on the next (an
    interrupted run). Returns the real ``write_shard`` (to restore it or to wrap it again)."""
    real = cache_build.write_shard
    calls = {"n": 0}

    def failing(*a, **kw):
        if calls["n"] >= n:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(cache_build, "write_shard", failing)
    return real


def record_writes(monkeypatch, real) -> list:
    """Every shard file written from now on, by name, in order (``real``: the write to wrap)."""
    written = []

    def counting(*a, **kw):
        written.append(Path(a[0]).name)
        return real(*a, **kw)

    monkeypatch.setattr(cache_build, "write_shard", counting)
    return written
