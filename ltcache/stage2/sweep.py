"""Steps 2 and 3 of a stage-2 sweep (see :mod:`ltcache.stage2.plan`): configurations in
groups, each group trained as one computation of M stacked heads -- in this process, in forked
worker processes or split across torchrun ranks.

Reading order: :func:`train_sweep` -> :func:`~ltcache.stage2.grouping.make_groups` (step 2:
which configurations train together; :func:`~ltcache.stage2.workers.merge_plan` may merge
groups of one head family with different batch sizes, off by default) -> :mod:`~ltcache.stage2.workers` (the scheduler: the cost
of each group, whether to fork workers, which rank trains what; it is handed
:func:`~ltcache.stage2.group.train_group` and never calls back) -> :func:`train_group` (step 3,
:mod:`ltcache.stage2.group`: one group as one stacked computation).

Where the time goes: on a GPU or with large shapes (D 512+) the two bmm per step dominate,
with the element-wise loss work next (about a third of a D 512 step on a CPU). On a CPU with
small shapes (CIFAR-10, D 64) a step costs mostly per-op overhead, so the engine prepares each
epoch's indices and loss targets ahead on a thread and, on several cores, trains whole groups
side by side in forked single-thread worker processes (``n_jobs``, see
:mod:`ltcache.stage2.workers`; also used up to D 1024). On a GPU a step is launch-bound
(100-200 small kernels): it runs through static buffers, captured once per group as a CUDA
graph and replayed (:mod:`ltcache.stage2.graphs`), and the groups of a sweep may run side by side,
each on its own CUDA stream (:mod:`ltcache.stage2.streams`).

Optimiser: PyTorch SGD semantics (:mod:`ltcache.stage2.sgd`). Batches per epoch: the member's
sampler cut by its step rule (:mod:`ltcache.stage2.samplers`).

Learning-rate schedules, per epoch (each method's preset picks the one its script uses):
* ``cosine``       lr_e = lr/2 (1 + cos(pi e / E)), e = 0..E-1 -- LOS (CosineAnnealingLR
                   stepped after each epoch) and MiSLAS (explicit formula).
* ``cosine-start`` lr_e = lr/2 (1 + cos(pi (e+1) / E)) -- cRT, BALMS, BagofTricks and LTWB
                   call ``scheduler.step()`` at the start of each epoch under PyTorch >= 1.1,
                   so the last epoch has lr 0.
* ``constant``     lr_e = lr.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Sequence

import torch

from ltcache import distributed as _dist
from ltcache.errors import LtcacheError
from ltcache.options import SELECTS
from ltcache.stage2 import streams
from ltcache.stage2.group import GroupTrainer, train_group  # noqa: F401  (re-exported: sweep.GroupTrainer)
from ltcache.stage2.grouping import frozen_base, group_key, make_groups, stream_blocks, stream_key  # noqa: F401
from ltcache.stage2.params import SCHEDULES  # noqa: F401  (re-exported)
from ltcache.stage2.plan import Config, TrainData  # noqa: F401  (re-exported: sweep.Config, sweep.TrainData)
from ltcache.stage2.precision import feature_dtype, matmul_mode
from ltcache.stage2.selection import TrainedHead, eval_logits  # noqa: F401  (re-exported)
from ltcache.stage2.sgd import maxnorm_radius  # noqa: F401  (re-exported)
from ltcache.stage2.workers import merge_plan, rank_share, run_in_workers, worth_workers


def train_sweep(configs: Sequence[Config], data: TrainData, select: str = "last",
                quiet: bool = False, n_jobs: Optional[int] = None) -> list[TrainedHead]:
    """Train every configuration; groups by :func:`group_key`; results in input order.

    ``n_jobs``: worker processes for CPU sweeps of small heads (D <= 1024 or tiny steps;
    default: the cores torch may use)."""
    if select not in SELECTS:
        raise LtcacheError(f"unknown --select '{select}'; use {' or '.join(SELECTS)}")
    if select == "val" and data.val_x is None:
        raise LtcacheError("--select val needs a val split in the cache; use --select last "
                           "or extract the cache with a val split")
    low = feature_dtype(data.precision)
    if low != torch.float32 and data.x.dtype != low and data.gather is None:
        data = replace(data, x=data.x.to(low))        # bf16 features: cast once, before any fork
    with matmul_mode(data.precision):
        if _dist.init_from_env(data.x.device):
            return _train_across_ranks(configs, data, select, quiet, n_jobs)
        return _train_here(configs, data, select, quiet, n_jobs)


def _train_here(configs: Sequence[Config], data: TrainData, select: str, quiet: bool,
                n_jobs: Optional[int]) -> list[TrainedHead]:
    """:func:`train_sweep` in this process (and its forked workers)."""
    plan = merge_plan(make_groups(configs), configs, data)     # off unless LTCACHE_MERGE_GROUPS / workers.merging
    out: list[Optional[TrainedHead]] = [None] * len(configs)
    jobs = min(n_jobs or os.cpu_count() or 1, torch.get_num_threads())
    if not worth_workers(plan, configs, data, jobs):
        if streams.wanted(len(plan), data.x.device):      # groups side by side, one CUDA stream each
            trained = streams.train_groups([[configs[i] for i in members] for members in plan], data, select, quiet)
        else:
            trained = [train_group([configs[i] for i in members], data, select=select, quiet=quiet)
                       for members in plan]
        for members, heads in zip(plan, trained):
            for i, t in zip(members, heads):
                out[i] = t
        return out  # type: ignore[return-value]
    # Small steps on a CPU are bound by per-op (Python) overhead, which OpenMP threads inside
    # each op do not shorten, and mid-size ones (D <= 1024) by element-wise work that spreads
    # better over processes: train whole groups side by side in worker processes.
    for i, t in run_in_workers(train_group, plan, configs, data, select, quiet, jobs):
        out[i] = t
    return out  # type: ignore[return-value]


def _train_across_ranks(configs: Sequence[Config], data: TrainData, select: str, quiet: bool,
                        n_jobs: Optional[int]) -> list[TrainedHead]:
    """torchrun (:mod:`ltcache.distributed`): the same plan checked on every rank, its groups
    split (balanced as the workers' parts are) across the ranks, each rank's share trained here,
    the heads all-gathered: every rank returns every configuration's head, in input order."""
    keys = [(c.name, c.method, c.seed, sorted(c.params.items()), c.head, c.init, c.sampler, c.lr, c.wd,
             c.epochs, c.batch_size, c.momentum, c.schedule, c.lr_factor, c.maxnorm_thresh, c.scale,
             c.bias_init, c.steps, c.no_wd) for c in configs]
    _dist.check_same((keys, select, tuple(data.x.shape), tuple(data.w0.shape)), "sweep")
    mine = rank_share(merge_plan(make_groups(configs), configs, data), configs, data, _dist.world(), _dist.rank())
    trained = _train_here([configs[i] for i in mine], data, select, quiet, n_jobs) if mine else []
    _dist.barrier("the sweep")                                     # gloo: names a rank that died training
    out: list[Optional[TrainedHead]] = [None] * len(configs)
    for idx, heads in _dist.all_gather_objects((mine, trained), what="the gather of the trained heads"):
        for i, t in zip(idx, heads):
            out[i] = t
    return out  # type: ignore[return-value]
