"""The engine's switches: a mode read once from the environment and changed for a block of code.

Each GPU path of the engine (CUDA graphs, group streams, merged groups) is off by default until
``benchmarks/gpu_check.py`` has measured it on a device; a :class:`Switch` holds its mode, which
a user sets with an environment variable and code (tests, benchmarks) with :meth:`Switch.scoped`.
Worker processes forked inside a block inherit the block's mode.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ltcache.errors import LtcacheError


class Switch:
    """The mode of one engine path: one of ``modes``, from ``$env`` (default ``default``)."""

    def __init__(self, env: str, modes: tuple, default: str, what: str) -> None:
        self.env, self.modes, self.what = env, modes, what
        value = os.environ.get(env, default)
        if value not in modes:
            raise LtcacheError(f"{env}={value} is unknown; use one of {', '.join(modes)}")
        self.value = value

    def check(self, mode: str) -> str:
        """``mode``, or a ValueError naming the modes there are."""
        if mode not in self.modes:
            raise ValueError(f"unknown {self.what} mode '{mode}'; use one of {', '.join(self.modes)}")
        return mode

    @contextmanager
    def scoped(self, mode: str) -> Iterator[None]:
        """Within the block, the switch is at ``mode``."""
        old, self.value = self.value, self.check(mode)
        try:
            yield
        finally:
            self.value = old
