"""The training step as a function of static buffers, replayed as a CUDA graph on a GPU.

A step of :class:`~ltcache.stage2.group.GroupTrainer` reads, besides the group's parameters
and momentum buffers (updated in place), only per-step tensors of its :class:`Epoch`: the
cache rows, the loss targets and the update's per-member factors. :class:`StaticStep` keeps
one static buffer per such tensor and a static one-step ``Epoch`` whose fields *are* those
buffers; a step copies step s's tensors in (``copy_``: exact) and runs the group's own
:meth:`~GroupTrainer.step` on the static epoch. The arithmetic is the eager step's, op for op,
so on a CPU the buffer path equals the eager step bit for bit (``tests/test_stage2_graphs.py``).

On CUDA the static step is captured once per group and variant (the update's fused or
masked branch, shared-row gathers or not: at most four) with ``torch.cuda.CUDAGraph`` and
replayed: one launch per step instead of 100-200. The first step of each variant runs eagerly
(the warm-up the capture needs, on a side stream; it is a real training step), the capture
records the next one without running it, and the replay runs it. A failed capture (an op
that syncs with the host, a shape the graph cannot hold) falls back to eager for that group,
with a one-line notice on stderr. Groups whose inputs come from a gather callback or that hold
forward-only losses (autograd) always step eagerly.

The mode (:func:`step_graphs`, or ``LTCACHE_STEP_GRAPHS`` in the environment): ``"auto"``
(graphs on CUDA, the plain eager step on a CPU), ``"on"`` (the buffer path on any device;
captured on CUDA), ``"compile"`` (the buffer path; on CUDA the static step compiled by
``torch.compile(mode="reduce-overhead")``, Inductor's kernels replayed as CUDA graphs, instead
of the hand capture: the alternative the GPU check times against it), ``"off"`` (the plain step). The default is ``"off"`` until the capture has
been checked on a GPU: ``benchmarks/gpu_check.py`` trains every group both ways and compares
the metrics; the buffer path's logic itself is checked bit for bit on the CPU.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Optional

import torch

from ltcache.errors import LtcacheError

MODES = ("auto", "on", "off", "compile")
_mode = os.environ.get("LTCACHE_STEP_GRAPHS", "off")
if _mode not in MODES:
    raise LtcacheError(f"LTCACHE_STEP_GRAPHS={_mode} is unknown; use one of {', '.join(MODES)}")
STATS = {"captured": 0, "failed": []}    # graphs captured / capture failures (one line each) in this process


@contextmanager
def step_graphs(mode: str) -> Iterator[None]:
    """Within the block, groups step in ``mode`` (``auto``, ``on`` or ``off``; module docstring).
    Worker processes forked inside the block inherit it."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"unknown step-graph mode '{mode}'; use one of {', '.join(MODES)}")
    old, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = old


def wanted(group) -> bool:
    """Whether ``group`` (a GroupTrainer) steps through static buffers in the current mode."""
    if _mode == "off" or (_mode == "auto" and group.dev.type != "cuda"):
        return False
    return group.user is None and group.data.gather is None


def _static(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


def _load(dst, src) -> None:
    if dst is not None:
        dst.copy_(src, non_blocking=True)


class StaticStep:
    """Static input buffers of one group's step and, on CUDA, its captured graphs."""

    def __init__(self, group) -> None:
        self.g = group
        self.cuda = group.dev.type == "cuda"
        self.graphs: dict = {}
        self.eager_only: set = set()       # variants whose capture failed
        self.seen: set = set()              # variants stepped once (the capture's warm-up)
        self.bufs = None
        self.side = torch.cuda.Stream() if self.cuda else None

    # -- buffers --------------------------------------------------------------------------

    def _alloc(self, ep, s: int) -> None:
        """Static buffers shaped as step s's tensors (the same shapes at every step)."""
        t = ep.targets[s]
        sh = ep.shared
        self.bufs = {
            "rows": _static(ep.rows[s]),
            "shared": (_static(sh[0][s]), _static(sh[1][s])) if sh else None,
            "targets": type(t)(*(_static(f) for f in t)),
            "c_mom": {a: _static(v[s]) for a, v in ep.c_mom.items()},
            "act": {a: _static(v[s]) for a, v in ep.act.items()},
            "neg_lr": {a: _static(v[s]) for a, v in ep.neg_lr.items()},
        }
        self.views = {}

    def load(self, ep, s: int) -> tuple:
        """Copy step s's tensors into the static buffers; the step's variant (fused/masked update,
        shared rows or not)."""
        if self.bufs is None:
            self._alloc(ep, s)
        b, shared = self.bufs, ep.shared is not None
        if shared and b["shared"] is None:
            b["shared"] = (_static(ep.shared[0][s]), _static(ep.shared[1][s]))
        _load(b["rows"], ep.rows[s])
        if shared:
            _load(b["shared"][0], ep.shared[0][s])
            _load(b["shared"][1], ep.shared[1][s])
        for dst, src in zip(b["targets"], ep.targets[s]):
            _load(dst, src)
        for name in ("c_mom", "act", "neg_lr"):
            for a, v in getattr(ep, name).items():
                _load(b[name][a], v[s])
        return bool(ep.paused[s]), shared

    def view(self, ep, variant: tuple):
        """The one-step Epoch of a variant whose fields are the static buffers."""
        if variant not in self.views:
            b = self.bufs
            self.views[variant] = replace(
                ep, s_max=1, rows=(b["rows"],), valid=(None,), shared=((b["shared"][0],), (b["shared"][1],))
                if variant[1] else None, targets=[b["targets"]], user=None, paused=[variant[0]],
                c_mom={a: (t,) for a, t in b["c_mom"].items()}, act={a: (t,) for a, t in b["act"].items()},
                neg_lr={a: (t,) for a, t in b["neg_lr"].items()})
        return self.views[variant]

    # -- a step ---------------------------------------------------------------------------

    def step(self, ep, s: int) -> None:
        """Step s of epoch ``ep`` through the static buffers (replayed graph on CUDA)."""
        variant = self.load(ep, s)
        static = self.view(ep, variant)
        if not self.cuda or variant in self.eager_only:
            self.g.step(static, 0)
            return
        if _mode == "compile":
            self._compiled(static, variant)
            return
        graph = self.graphs.get(variant)
        if graph is not None:
            graph.replay()
            return
        if variant not in self.seen:                  # warm-up: a real step, eagerly, on a side stream
            self.seen.add(variant)
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.g.step(static, 0)
            torch.cuda.current_stream().wait_stream(self.side)
            return
        graph = self._capture(static, variant)
        if graph is None:
            self.g.step(static, 0)
        else:
            graph.replay()

    def _capture(self, static, variant: tuple) -> Optional["torch.cuda.CUDAGraph"]:
        """The step captured (recorded, not run) or None after a one-line notice."""
        try:                                      # pragma: no cover - needs a CUDA device
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the next epoch, prepared meanwhile on a thread, neither breaks the
            # capture nor is broken by it
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.g.step(static, 0)
            self.graphs[variant] = graph
            STATS["captured"] += 1
            return graph
        except Exception as exc:                  # pragma: no cover - needs a CUDA device
            self.eager_only.add(variant)
            torch.cuda.synchronize()
            line = (f"note: CUDA graph capture failed for the {self.g.family} B={self.g.bsz} group "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); stepping eagerly")
            STATS["failed"].append(line)
            print(line, file=sys.stderr)
            return None

    def _compiled(self, static, variant: tuple) -> None:
        """The static step through ``torch.compile(mode="reduce-overhead")`` (compiled at its
        first call per variant); a failed compile steps eagerly after a one-line notice. The
        parameters, momentum buffers and static inputs keep their addresses, so the compiled
        graphs may update them in place."""
        fn = self.graphs.get(variant)
        if fn is None:                            # pragma: no cover - needs a CUDA device
            for t in _state(self.g) + _state(self.bufs):
                torch._dynamo.mark_static_address(t)
            g = self.g
            fn = self.graphs[variant] = torch.compile(lambda: g.step(static, 0), mode="reduce-overhead")
        try:                                      # pragma: no cover - needs a CUDA device
            fn()
            STATS["captured"] += 1 if variant not in self.seen else 0
            self.seen.add(variant)
        except Exception as exc:                  # pragma: no cover - needs a CUDA device
            self.eager_only.add(variant)
            line = (f"note: torch.compile of the {self.g.family} B={self.g.bsz} group's step failed "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); stepping eagerly")
            STATS["failed"].append(line)
            print(line, file=sys.stderr)
            self.g.step(static, 0)


def _state(obj) -> list:
    """The tensors a static step updates or reads in place: a group's parameters and momentum
    buffers, or a StaticStep's input buffers."""
    if isinstance(obj, dict):
        found = []
        for v in obj.values():
            found += _state(v)
        return found
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _state(v)]
    if hasattr(obj, "opt"):                       # a GroupTrainer
        return _state(obj.p) + _state(obj.opt.mbuf)
    return []
