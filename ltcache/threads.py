"""How many threads a command uses: the cores actually free, unless the user says.

torch starts one intra-op thread per core whether or not other processes are using those cores;
on a busy machine the threads of one op then wait for each other (oversubscription) and a small
stage-2 sweep runs 1.5-4x slower than on one thread. The stage-2 commands therefore use the
cores that are free when they start -- the cores this process may run on, less the load the
other processes put on them (the 1-minute load average) -- and ``--threads N`` overrides that.
The engine's worker fan-out follows: it forks at most as many single-thread processes as there
are threads, so a loaded 2-core box gets one single-thread process.
"""
from __future__ import annotations

import os
from typing import Optional

from ltcache.errors import LtcacheError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):          # pragma: no cover (not Linux)
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """DataLoader workers by default: the cores this process may use, at most 8."""
    return min(usable_cores(), 8)


def free_cores(load: Optional[float] = None) -> int:
    """Usable cores less the 1-minute load average of the machine (``load`` for tests), at
    least 1. The load counts runnable processes, this one included once it runs, so it is read
    before the work starts."""
    cores = usable_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):      # pragma: no cover
            return cores
    return max(1, min(cores, cores - int(round(load))))


def choose_threads(requested: Optional[int] = None, load: Optional[float] = None) -> int:
    """``requested`` if given (checked), else the free cores (never more than torch's default)."""
    if requested is not None:
        if requested < 1:
            raise LtcacheError(f"--threads must be >= 1 (got {requested}); 1 runs everything on one core")
        return int(requested)
    import torch                               # here, so that `ltcache --help` does not load torch
    return max(1, min(torch.get_num_threads(), free_cores(load)))


def apply_threads(requested: Optional[int] = None, quiet: bool = True) -> int:
    """Set torch's intra-op threads for this process from :func:`choose_threads`; returns it.
    (Silent: the count goes into the results as ``threads``.)"""
    import torch
    n = choose_threads(requested)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
