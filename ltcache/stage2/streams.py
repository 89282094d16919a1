"""Several groups of one sweep trained side by side on one device: each group's work issued to
a CUDA stream of its own, their steps taken in turn from this one host thread.

A group's step is a chain of small kernels (or one CUDA-graph replay, :mod:`ltcache.stage2.graphs`)
that each fill a fraction of a GPU. Trained one after another, the groups of an all-methods
sweep leave the device mostly idle; on separate streams their kernels run concurrently, so the
sweep takes about as long as its longest group instead of the sum. The host takes one step of
each live group in turn (:class:`~ltcache.stage2.group.GroupRun` yields after every step), with
that group's stream current; each group's epochs are prepared ahead on a thread that issues its
copies to the same stream. Nothing crosses streams: a group's parameters, momentum buffers and
epochs are made and used on its own stream, after one wait for the inputs on the default stream.

The arithmetic of every group is unchanged, so the heads are those of the groups trained one
after another; on a CPU the same interleaving runs with no streams (there it buys nothing: a
CPU sweep trains groups side by side in worker processes, :mod:`ltcache.stage2.workers`), and
the tests check it bit for bit against the sequential groups, and check the CUDA plumbing with
stand-in streams (each group's initialisation, steps and epoch preparation under its own stream,
the waits at the start and the end).

The mode (:func:`group_streams`, or ``LTCACHE_GROUP_STREAMS`` in the environment): ``"auto"``
(streams for a sweep of several groups on CUDA), ``"on"`` (interleaved on any device; streams on
CUDA), ``"off"`` (groups one after another). The default is ``"off"`` until
``benchmarks/gpu_check.py`` has timed and compared it on a GPU.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import torch

from ltcache.stage2.group import GroupRun
from ltcache.stage2.plan import Config, TrainData
from ltcache.stage2.selection import TrainedHead
from ltcache.stage2.switches import Switch

SWITCH = Switch("LTCACHE_GROUP_STREAMS", ("auto", "on", "off"), "off", "group-stream")
MODES = SWITCH.modes


def group_streams(mode: str):
    """Within the block (``with group_streams(mode):``), sweeps train their groups in ``mode``
    (``auto``, ``on`` or ``off``; module docstring)."""
    return SWITCH.scoped(mode)


def wanted(n_groups: int, dev: torch.device) -> bool:
    """Whether a sweep of ``n_groups`` groups on ``dev`` interleaves them in the current mode."""
    mode = SWITCH.value
    if mode == "off" or n_groups < 2:
        return False
    return mode == "on" or dev.type == "cuda"


def train_groups(groups: Sequence[Sequence[Config]], data: TrainData, select: str = "last",
                 quiet: bool = False) -> list[list[TrainedHead]]:
    """Every group of ``groups`` trained, their steps in turn (each group on its own CUDA stream
    on a GPU); the trained heads per group, as :func:`~ltcache.stage2.group.train_group` gives them."""
    dev = data.x.device
    streams = _device_streams(dev, len(groups))
    for s in streams:
        if s is not None:
            s.wait_stream(torch.cuda.current_stream(dev))    # the features / stage-1 layer are ready
    runs = [GroupRun(cfgs, data, select, quiet, bar_position=i, stream=s)
            for i, (cfgs, s) in enumerate(zip(groups, streams))]
    steps = [iter(r) for r in runs]
    live = list(range(len(runs)))
    try:
        while live:
            for i in list(live):
                with _current(streams[i]):
                    if next(steps[i], _DONE) is _DONE:
                        live.remove(i)
    finally:
        for it in steps:
            it.close()                      # an error in one group: the others' threads and bars end too
        for s in streams:
            if s is not None:
                torch.cuda.current_stream(dev).wait_stream(s)
    return [r.heads for r in runs]  # type: ignore[misc]


_DONE = object()


def _device_streams(dev: torch.device, n: int) -> list:
    """A new CUDA stream for each of n groups on a GPU; None for each on a CPU."""
    return [torch.cuda.Stream(dev) for _ in range(n)] if dev.type == "cuda" else [None] * n


def _current(stream: Optional["torch.cuda.Stream"]):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()
