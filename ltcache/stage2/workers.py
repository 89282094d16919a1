"""The sweep's scheduler: the cost model of a group, the balance of groups over worker processes
(CPU sweeps on several cores: groups trained side by side in forked workers) and over torchrun
ranks. It places groups; the training itself comes in as a function (:func:`run_in_workers`'
``train_group``) and nothing here calls back into the sweep.

A step on small shapes (CIFAR-10, D 64) costs mostly Python and per-op overhead, which the
OpenMP threads inside each op do not shorten and which threads of one process would only share
(the GIL); with D up to ~1024 (CIFAR-100, D 512) the element-wise loss work still weighs against
the GEMMs and also spreads better over processes than over threads. So each core gets a
process with one intra-op thread, as DataLoader workers do. The
features reach the workers by fork (copy-on-write, nothing pickled); only configurations and
trained heads cross the pipe. The costliest group may be split to balance the workers: a
configuration's result does not depend on which group, split or process it trained in.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from typing import Callable, Iterator, Optional, Sequence

import torch

from ltcache.stage2.grouping import frozen_base, merge_key
from ltcache.stage2.losses import loss_signature
from ltcache.stage2.samplers import steps_per_epoch
from ltcache.stage2.switches import Switch

SMALL_STEP = 2e7          # M * B * D * K of one step below which a CPU step is op-overhead bound
# Up to this feature dim the element-wise loss work on the [M, K, B] logits (tens of ops per
# logit) weighs against the GEMMs (4 D flops per logit), and it scales better over processes
# than over the OpenMP threads of one op: measured on the CIFAR-100 shape (D 512), forked
# single-thread workers train the sweep ~10 % faster than one process on both cores. At D 2048
# the GEMMs dominate and one process with all threads is as fast.
ELEMENTWISE_D = 1024
MIN_PARALLEL_WORK = 1e10  # below this (well under a second of work) forking workers does not pay
# The cost model of a group (:func:`_work`), in multiply-adds of a CPU core, fitted to
# ``benchmarks/profile_groups.py`` on one thread (D 64 and D 512; 1.5e10 units ~ one second): a
# step costs a fixed ~0.1 ms of op overhead, ~70 us more per distinct loss (its optional terms
# are ops of their own) plus, per member and logit, D multiply-adds of the two GEMMs and ~150
# equivalents of element-wise loss and update work (more with many loss terms).
STEP_OVERHEAD = 1.5e6
LOSS_OVERHEAD = 1e6
ELEMENTWISE_PER_LOGIT = 150
# A step where some member idles before training again takes the masked update (a few more ops).
PAUSED_OVERHEAD = 3e5
# Groups of one head family with different batch sizes merge (``auto``) when the cost model
# saves more than this fraction of their work: the padded work against one fewer step stream.
MERGE_GAIN = 0.1
MERGE = Switch("LTCACHE_MERGE_GROUPS", ("auto", "on", "off"), "off", "group-merge")
MERGE_MODES = MERGE.modes
_FORKED = None            # (train_group, configs, data, select) inherited by the forked workers
_IN_WORKER = False


def in_worker() -> bool:
    """True inside a worker process (every core already runs one: no extra threads there)."""
    return _IN_WORKER


def worth_workers(plan: list[list[int]], configs, data, jobs: int) -> bool:
    """Whether to fan ``plan`` (lists of member indices, one per group) out to ``jobs`` workers."""
    small = (data.x.shape[-1] <= ELEMENTWISE_D
             or all(_step_size(configs, members, data) <= SMALL_STEP for members in plan))
    worth = sum(_work(configs, members, data) for members in plan) > MIN_PARALLEL_WORK
    return (jobs >= 2 and small and worth and "fork" in multiprocessing.get_all_start_methods()
            and data.x.device.type == "cpu" and data.gather is None
            and len(_balance(plan, configs, data, jobs)) >= 2)     # one part: all threads in-process


def run_in_workers(train_group: Callable, plan: list[list[int]], configs: Sequence, data, select: str,
                   quiet: bool, jobs: int) -> Iterator[tuple]:
    """Train every group of ``plan`` in ``jobs`` forked workers; yields (config index, TrainedHead)."""
    global _FORKED
    parts = _balance(plan, configs, data, jobs)
    _FORKED = (train_group, configs, data, select)
    try:
        workers = min(jobs, len(parts))
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
            for members, trained in pool.imap_unordered(_train_part, [(m, quiet, workers) for m in parts]):
                yield from zip(members, trained)
    finally:
        _FORKED = None


def _worker_init() -> None:
    global _IN_WORKER
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the pool's terminate() ends a worker quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    _IN_WORKER = True


def _train_part(arg):
    members, quiet, workers = arg
    train_group, configs, data, select = _FORKED
    ident = multiprocessing.current_process()._identity      # (..., worker number) in a Pool
    slot = (ident[-1] - 1) % workers if ident else 0          # one progress-bar line per worker
    return members, train_group([configs[i] for i in members], data, select=select, quiet=quiet, bar_position=slot)


def _step_size(configs: Sequence, members: list[int], data) -> float:
    d, k = data.x.shape[-1], data.w0.shape[0]
    return len(members) * max(configs[i].batch_size for i in members) * d * k


def _steps(configs: Sequence, members: list[int], n: int) -> tuple[int, int]:
    """(steps, paused steps) of ``members`` trained as one group: per epoch the longest live
    member's steps; a step where a member that trains on later sits idle takes the masked update."""
    per = [(configs[i].epochs, steps_per_epoch(configs[i].sampler, n, configs[i].batch_size, configs[i].steps))
           for i in members]
    steps = paused = 0
    for e in range(max(ep for ep, _ in per)):
        live = [s for ep, s in per if e < ep]
        steps += max(live)
        later = [s for ep, s in per if e + 1 < ep]           # members that train in a later epoch
        paused += max(live) - min(later) if later else 0
    return steps, paused


def _work(configs: Sequence, members: list[int], data) -> float:
    """Rough cost of training ``members`` as one group, in multiply-adds: steps x (a fixed
    per-step cost and one per distinct loss + per member B K (D + elementwise)), B the largest
    member's batch (smaller ones are padded), plus the masked update's extra per paused step;
    frozen-base groups do no D-sized work."""
    n, d, k = data.x.shape[0], data.x.shape[-1], data.w0.shape[0]
    b = max(configs[i].batch_size for i in members)
    steps, paused = _steps(configs, members, n)
    per_logit = (0 if all(frozen_base(configs[i]) for i in members) else d) + ELEMENTWISE_PER_LOGIT
    losses = len({loss_signature(configs[i].loss) for i in members})
    return (steps * (STEP_OVERHEAD + LOSS_OVERHEAD * losses + len(members) * b * k * per_logit)
            + paused * PAUSED_OVERHEAD)


def merging(mode: str):
    """Within the block (``with merging(mode):``), sweeps merge groups of one head family in
    ``mode`` (else ``LTCACHE_MERGE_GROUPS``): ``off``, ``auto`` (where the cost model gains over
    ``MERGE_GAIN``) or ``on`` (all); worker processes forked inside the block inherit it."""
    return MERGE.scoped(mode)


def merge_plan(plan: list[list[int]], configs: Sequence, data, mode: Optional[str] = None) -> list[list[int]]:
    """``plan`` (groups of one batch size, :func:`~ltcache.stage2.grouping.make_groups`) with
    groups of the same :func:`~ltcache.stage2.grouping.merge_key` merged into one step stream:
    every member's batches padded to the group's largest, a member with fewer steps idling.
    ``on``: all such groups; ``auto``: greedily the pair whose merge the cost model
    (:func:`_work`) values most, while it saves more than ``MERGE_GAIN`` of the pair's work --
    frozen-base groups only with frozen-base groups (merged into the others, their members pay
    the features' GEMM and the scale's ops on every step: no gain measured, benchmarks/RESULTS.md);
    ``off``: ``plan`` as it is. A configuration's result does not depend on its group."""
    mode = MERGE.check(mode or MERGE.value)
    if mode == "off":
        return [list(p) for p in plan]
    by_key: dict[tuple, list[list[int]]] = {}
    for p in plan:
        by_key.setdefault(merge_key(configs[p[0]]), []).append(list(p))
    out = []
    for parts in by_key.values():
        if mode == "on":
            out.append([i for p in parts for i in p])
            continue
        while len(parts) > 1:
            def gain(a, b):
                both = _work(configs, a, data) + _work(configs, b, data)
                return (both - _work(configs, a + b, data)) / both
            pairs = [(gain(a, b), x, y) for x, a in enumerate(parts) for y, b in enumerate(parts)
                     if x < y and frozen_base(configs[a[0]]) == frozen_base(configs[b[0]])]
            best = max(pairs, default=(0.0, 0, 0))
            if best[0] <= MERGE_GAIN:
                break
            _, x, y = best
            parts[x] = parts[x] + parts.pop(y)
        out.extend(parts)
    return out


def _makespan(parts: list[list[int]], jobs: int, work: Callable) -> float:
    """The longest worker's work when ``parts`` go, costliest first, each to the worker that is
    free first (as the pool hands them out)."""
    loads = [0.0] * jobs
    for w in sorted((work(p) for p in parts), reverse=True):
        loads[loads.index(min(loads))] += w
    return max(loads)


def _balance(plan: list[list[int]], configs, data, jobs: int) -> list[list[int]]:
    """Split the costliest group in halves while it holds more than a worker's share -- or most
    of it while other parts are there to fill around its halves (a part that large leaves the
    pool nothing to even out the cost model's errors with) -- and the halves are clearly cheaper
    (the per-step cost does not halve); then go on splitting while a split shortens the longest
    worker's share (:func:`_makespan`). The parts come back costliest first, so the pool starts
    the long ones first."""
    parts = [list(p) for p in plan]

    def work(p):
        return _work(configs, p, data)

    def halves(p):
        return [p[:len(p) // 2], p[len(p) // 2:]]

    for _ in range(4 * jobs):
        parts.sort(key=lambda p: -work(p))
        top = parts[0]
        share = sum(work(p) for p in parts) / jobs
        large = work(top) > share or (len(parts) > jobs and work(top) > 0.8 * share)
        if len(top) < 2 or not large or max(work(h) for h in halves(top)) > 0.75 * work(top):
            break
        parts[0:1] = halves(top)
    best = _makespan(parts, jobs, work)
    for _ in range(4 * jobs):
        parts.sort(key=lambda p: -work(p))
        for i, top in enumerate(parts):
            if len(top) < 2:
                continue
            trial = parts[:i] + halves(top) + parts[i + 1:]
            span = _makespan(trial, jobs, work)
            if span < 0.98 * best:
                parts, best = trial, span
                break
        else:
            break
    parts.sort(key=lambda p: -work(p))
    return parts


def rank_share(plan: list[list[int]], configs: Sequence, data, n: int, me: int) -> list[int]:
    """The configurations rank ``me`` of ``n`` trains (sorted): the groups of ``plan`` balanced as
    the workers' parts are (:func:`_balance`), the largest split further while a rank would be
    idle, then each part, costliest first, to the least-loaded rank. The same on every rank."""
    parts = _balance(plan, configs, data, n)                        # costliest first
    while len(parts) < n and max(len(p) for p in parts) >= 2:     # every rank gets work while it can
        top = max(parts, key=len)
        parts.remove(top)
        parts += [top[:len(top) // 2], top[len(top) // 2:]]
    parts.sort(key=lambda p: -_work(configs, p, data))
    if os.environ.get("LTCACHE_DIST_DEBUG"):
        print(f"rank {me}: parts {parts}", file=sys.stderr, flush=True)
    load, mine = [0.0] * n, []
    for part in parts:                                              # each part to the least-loaded rank
        r = min(range(n), key=lambda q: (load[q], q))
        load[r] += _work(configs, part, data)
        if r == me:
            mine.extend(part)
    return sorted(mine)
