"""The training step as a function of static buffers, replayed as a CUDA graph on a GPU.

A step of :class:`~ltcache.stage2.group.GroupTrainer` reads, besides the group's parameters
and momentum buffers (updated in place), only per-step tensors of its :class:`Epoch`: the
cache rows, the loss targets and the update's per-member factors. :class:`StaticStep` keeps
one static buffer per such tensor and a static one-step ``Epoch`` whose fields *are* those
buffers; a step copies step s's tensors in (``copy_``: exact) and runs the group's own
:meth:`~GroupTrainer.step` on the static epoch. The buffers are views into one flat buffer per
dtype, and each epoch's tensors are packed the same way once per epoch, so loading a step is
two or three copies (one launch each on a GPU) rather than one per tensor (10-25). The arithmetic is the eager step's, op for op,
so on a CPU the buffer path equals the eager step bit for bit (``tests/test_stage2_graphs.py``).
The CUDA branch's logic (warm-up, one capture per variant, replays, the fall-back after a failed
capture or compile) runs there too, with only :func:`_record` (the capture) and ``torch.compile``
replaced by stand-ins that record the step and replay it.

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

import sys
from dataclasses import replace
from typing import Optional

import torch

from ltcache.stage2.switches import Switch

SWITCH = Switch("LTCACHE_STEP_GRAPHS", ("auto", "on", "off", "compile"), "off", "step-graph")
MODES = SWITCH.modes
STATS = {"captured": 0, "failed": []}    # graphs captured / capture failures (one line each) in this process


def step_graphs(mode: str):
    """Within the block (``with step_graphs(mode):``), groups step in ``mode`` (``auto``, ``on``,
    ``compile`` or ``off``; module docstring). Worker processes forked inside the block inherit it."""
    return SWITCH.scoped(mode)


def wanted(group) -> bool:
    """Whether ``group`` (a GroupTrainer) steps through static buffers in the current mode."""
    mode = SWITCH.value
    if mode == "off" or (mode == "auto" and group.dev.type != "cuda"):
        return False
    return group.user is None and group.data.gather is None


class _Packed:
    """Static buffers of one step as views into one flat buffer per dtype, and each epoch's
    tensors packed the same way ([S, total] per dtype), so that loading step s is one copy per
    dtype instead of one per tensor (a step reads 10-25 small tensors: on a GPU each copy is a
    launch from the host; the packing is a few ops per epoch)."""

    def __init__(self, slots: list, ep, s: int) -> None:
        self.slots = slots                          # per slot: its epochs.Steps in an epoch, slot(ep)
        first = [slot(ep)[s] for slot in slots]
        dev = first[0].device
        sizes: dict = {}
        for t in first:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        self.flat = {dt: torch.empty(n, dtype=dt, device=dev) for dt, n in sizes.items()}
        self.bufs, used = [], dict.fromkeys(sizes, 0)
        for t in first:
            off = used[t.dtype]
            self.bufs.append(self.flat[t.dtype][off:off + t.numel()].view(t.shape))
            used[t.dtype] = off + t.numel()
        self.epoch = None
        self.packed: dict = {}

    def load(self, ep, s: int) -> None:
        """Step s of ``ep`` into the static buffers (the epoch packed at its first load)."""
        if self.epoch is not ep:
            self.epoch = ep
            parts: dict = {}
            for slot, buf in zip(self.slots, self.bufs):
                parts.setdefault(buf.dtype, []).append(slot(ep).whole.reshape(ep.s_max, -1))
            self.packed = {dt: torch.cat(p, 1) if len(p) > 1 else p[0].contiguous() for dt, p in parts.items()}
        for dt, flat in self.flat.items():
            flat.copy_(self.packed[dt][s], non_blocking=True)


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
        """Static buffers shaped as step s's tensors (the same shapes at every step): the rows,
        loss targets and update factors packed together, the shared-row blocks' rows apart (an
        epoch may or may not have them)."""
        t = ep.targets[s]
        fields = [i for i, f in enumerate(t) if f is not None]
        slots = [lambda e: e.rows] + [lambda e, j=j: e.target_steps[j] for j in fields]
        for name in ("c_mom", "act", "neg_lr"):
            slots += [lambda e, name=name, a=a: getattr(e, name)[a] for a in getattr(ep, name)]
        self.main = _Packed(slots, ep, s)
        bufs = iter(self.main.bufs)
        self.bufs = {"rows": next(bufs), "shared": None}
        by_field = {j: next(bufs) for j in fields}
        self.bufs["targets"] = type(t)(*(by_field.get(j) for j in range(len(t))))
        for name in ("c_mom", "act", "neg_lr"):
            self.bufs[name] = {a: next(bufs) for a in getattr(ep, name)}
        self.shared_pack: Optional[_Packed] = None
        self.views = {}

    def load(self, ep, s: int) -> tuple:
        """Copy step s's tensors into the static buffers; the step's variant (fused/masked update,
        shared rows or not)."""
        if self.bufs is None:
            self._alloc(ep, s)
        shared = ep.shared is not None
        if shared and self.shared_pack is None:
            self.shared_pack = _Packed([lambda e: e.shared[0], lambda e: e.shared[1]], ep, s)
            self.bufs["shared"] = tuple(self.shared_pack.bufs)
        self.main.load(ep, s)
        if shared:
            self.shared_pack.load(ep, s)
        return bool(ep.paused[s]), shared

    def view(self, ep, variant: tuple):
        """The one-step Epoch of a variant whose fields are the static buffers."""
        if variant not in self.views:
            b = self.bufs
            self.views[variant] = replace(
                ep, s_max=1, rows=(b["rows"],), valid=(None,), shared=((b["shared"][0],), (b["shared"][1],))
                if variant[1] else None, targets=[b["targets"]], target_steps=(), user=None, paused=[variant[0]],
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
        if SWITCH.value == "compile":
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
        try:
            graph = _record(lambda: self.g.step(static, 0))
            self.graphs[variant] = graph
            STATS["captured"] += 1
            return graph
        except Exception as exc:
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
        if fn is None:
            for t in _state(self.g) + _state(self.bufs):
                torch._dynamo.mark_static_address(t)
            # one code object (the lambda below) serves every group and variant of the sweep: each
            # is a recompile of it, and past dynamo's default limit (8) it would quietly run eagerly
            cfg = torch._dynamo.config
            for name, n in (("recompile_limit", 1024), ("cache_size_limit", 1024),          # (older torch: cache_*)
                            ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), n))
            g = self.g
            fn = self.graphs[variant] = torch.compile(lambda: g.step(static, 0), mode="reduce-overhead", dynamic=False)
        try:
            fn()
            STATS["captured"] += 1 if variant not in self.seen else 0
            self.seen.add(variant)
        except Exception as exc:
            # compile failures come at trace time, before the step has changed anything; one at run
            # time, part-way through an update, would be followed by a whole eager step
            self.eager_only.add(variant)
            line = (f"note: torch.compile of the {self.g.family} B={self.g.bsz} group's step failed "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); stepping eagerly")
            STATS["failed"].append(line)
            print(line, file=sys.stderr)
            self.g.step(static, 0)


def _record(fn) -> "torch.cuda.CUDAGraph":  # pragma: no cover - needs a CUDA device
    """``fn``'s kernels captured (recorded, not run) as a CUDA graph: the one part of this module
    the CPU tests replace (``tests/test_stage2_graphs.py`` records ``fn`` itself)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the next epoch, prepared meanwhile on a thread, neither breaks the capture
    # nor is broken by it
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph


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
