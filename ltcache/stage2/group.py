"""Step 3 of a stage-2 sweep: one group (:mod:`ltcache.stage2.grouping`) trained as one
computation of M stacked heads.

Their parameters are stacked ([M, K, D] ...). Per epoch, every configuration draws its own
index batches (:mod:`ltcache.stage2.epochs`). Per step there is one gather, one batched
matmul, the analytic gradient of the vectorised loss of all M configurations
(per-configuration hyper-parameters as tensors; no autograd graph), one bmm for the weight
gradient and one hand-written batched SGD-momentum update (:mod:`ltcache.stage2.sgd`; members
whose loss is given only as a forward get their loss gradient by autograd,
:mod:`ltcache.stage2.losses._fallback`, placed into the group's). Heads that train only an
affine correction of the frozen stage-1 layer (LWS, MARC) gather precomputed base logits
instead of features. Members that read the same rows sit in blocks that share one gather and
one wider GEMM; the loss still sees the members in the caller's order. Python loops run over
epochs, steps and parameter names, never over configurations inside a step.

Reading order: :func:`train_group` drives a :class:`GroupTrainer`: its initialisation stacks
the members' parameters; :meth:`~GroupTrainer.prepare_epoch` makes an epoch's index batches
and per-step factors; :meth:`~GroupTrainer.step` is features -> forward
(:func:`heads.forward_train`) -> loss gradient -> backward (:func:`heads.backward`) -> update;
:meth:`~GroupTrainer.end_epoch` projects (MaxNorm) and selects on val
(:mod:`ltcache.stage2.selection`); :meth:`~GroupTrainer.collect` gives each member's
deployable layer. On a GPU a step runs through static buffers, captured once per group as a
CUDA graph and replayed (:mod:`ltcache.stage2.graphs`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch

from ltcache.progress import progress
from ltcache.stage2 import graphs
from ltcache.stage2 import heads as H
from ltcache.stage2.epochs import Epoch, make_epoch
from ltcache.stage2.graphs import StaticStep
from ltcache.stage2.grouping import frozen_base, member_order, merge_key
from ltcache.stage2.losses import batched_loss_grad, stack_specs
from ltcache.stage2.losses._fallback import AutogradLossGrad
from ltcache.stage2.plan import Config, TrainData
from ltcache.stage2.precision import feature_dtype
from ltcache.stage2.samplers import epoch_samples, steps_per_epoch
from ltcache.stage2.selection import Selection, TrainedHead
from ltcache.stage2.sgd import StackedSGD
from ltcache.stage2.workers import in_worker


@torch.no_grad()
def train_group(cfgs: Sequence[Config], data: TrainData, select: str = "last",
                quiet: bool = False, bar_position: int = 0) -> list[TrainedHead]:
    """Train M configurations of one group (same :func:`~ltcache.stage2.grouping.merge_key`:
    usually also the same batch size, see :func:`~ltcache.stage2.workers.merge_plan`) together."""
    run = GroupRun(cfgs, data, select, quiet, bar_position)
    for _ in run:
        pass
    return run.heads


class GroupRun:
    """One group's training as an iterator that yields after every step, so that several groups
    can be stepped in turn (:mod:`ltcache.stage2.streams`: each on its own CUDA stream);
    :func:`train_group` runs one to the end. After the last step ``heads`` holds the trained
    heads. ``stream``: the CUDA stream the group's work is issued to (the caller makes it
    current around each step); the epochs prepared ahead on a thread are issued to it too."""

    def __init__(self, cfgs: Sequence[Config], data: TrainData, select: str = "last", quiet: bool = False,
                 bar_position: int = 0, stream: Optional["torch.cuda.Stream"] = None) -> None:
        self.cfgs, self.data, self.select, self.quiet, self.bar_position = cfgs, data, select, quiet, bar_position
        self.stream = stream
        self.heads: Optional[list[TrainedHead]] = None

    @torch.no_grad()
    def __iter__(self) -> Iterator[None]:
        group = GroupTrainer(self.cfgs, self.data, self.select)      # the stacked parameters, initialised
        label = "frozen-base " if group.base else ""
        bar = progress(total=group.total_steps, desc=f"train {label}{group.family} B={group.bsz} x{group.m}",
                       quiet=self.quiet, unit="step", position=self.bar_position)
        step = StaticStep(group).step if graphs.wanted(group) else group.step     # CUDA graphs (graphs.py)
        try:
            with _prepared_ahead(group.prepare_epoch, group.epochs, group.dev, self.stream) as epochs:
                for e, ep in epochs:
                    for s in range(ep.s_max):
                        step(ep, s)                 # features -> forward -> loss grad -> backward -> update
                        yield
                    bar.update(ep.s_max)
                    group.end_epoch(e)              # MaxNorm projection, val selection
        finally:
            bar.close()
        self.heads = group.collect()


@contextmanager
def _prepared_ahead(prepare: Callable[[int], Epoch], epochs: int, dev: torch.device,
                    stream: Optional["torch.cuda.Stream"] = None) -> Iterator:
    """(e, prepare(e)) for every epoch; each epoch prepared on a thread while the previous one
    trains when this process runs ops on one thread (or a GPU): beside multi-threaded CPU ops it
    would only compete for the same cores. With ``stream`` the thread issues its device copies
    to that stream (the group's), so the steps that read them are ordered after them and their
    memory is the stream's own."""
    pool = (ThreadPoolExecutor(max_workers=1)
            if dev.type == "cuda" or (not in_worker() and torch.get_num_threads() == 1) else None)

    def on_stream(e: int) -> Epoch:
        with torch.cuda.stream(stream):
            return prepare(e)
    job = on_stream if stream is not None else prepare

    def stream_of_epochs():
        upcoming = pool.submit(job, 0) if pool else None
        for e in range(epochs):
            ep = upcoming.result() if pool else job(e)
            if pool and e + 1 < epochs:
                upcoming = pool.submit(job, e + 1)
            yield e, ep

    try:
        yield stream_of_epochs()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


class GroupTrainer:
    """The state of M configurations of one group trained together.

    Parameters live in "param order" (members reading the same rows in blocks, see
    :func:`~ltcache.stage2.grouping.stream_blocks`); the loss sees the caller's order (its
    optional terms on contiguous slices), members with a forward-only loss (autograd fallback)
    moved after the ``nb`` built-in ones. :meth:`prepare_epoch` makes an epoch's batches,
    :meth:`step` trains one step, :meth:`end_epoch` projects and selects, :meth:`collect` gives
    the trained heads."""

    def __init__(self, cfgs: Sequence[Config], data: TrainData, select: str = "last"):
        keys = {merge_key(c) for c in cfgs}                 # once per configuration
        if len(keys) != 1:
            raise ValueError("train_group needs configurations of one merge_key (head family)")
        (self.family,) = keys.pop()
        # the frozen-base path (base logits gathered from a table) when every member is frozen-base
        self.base = all(frozen_base(c) for c in cfgs)
        # the step's batch: the largest member's; smaller members' batches padded with invalid samples
        self.bsz = max(c.batch_size for c in cfgs)
        self.data, self.select = data, select
        self.dev, self.m = data.x.device, len(cfgs)
        self.n, self.n_views, self.d = data.x.shape
        self.k = data.w0.shape[0]
        self._order_members(cfgs)
        self._init_params()
        ci = data.class_index
        steps = [steps_per_epoch(c.sampler, ci.n, c.batch_size, c.steps, epoch_samples(c.sampler, ci))
                 for c in self.cfgs]
        self.opt = StackedSGD(self.cfgs, self.p, self.need, steps, self.w0c, self.dev)
        self._init_losses()
        self._init_inputs()
        self.epochs = max(c.epochs for c in self.cfgs)
        self.total_steps = sum(max(n for c, n in zip(self.cfgs, steps) if e < c.epochs) for e in range(self.epochs))
        self.sel = Selection(self.cfgs, self.p, select, self.dev)

    # -- initialisation -----------------------------------------------------------------------

    def _order_members(self, cfgs: Sequence[Config]) -> None:
        """Param order (blocks first) and loss order (built-in losses, then forward-only ones)."""
        m, dev = self.m, self.dev
        mo = member_order(cfgs, not self.base and self.data.gather is None, self.data.class_index.counts)
        self.order, self.n_blocks, self.r = mo.order, mo.n_blocks, mo.r
        loss_pos = {c: j for j, c in enumerate(mo.by_loss)}
        self.loss_cfgs, self.cfgs = [cfgs[i] for i in mo.by_loss], [cfgs[i] for i in self.order]
        self.nb = sum(c.loss.user is None for c in self.loss_cfgs)
        param_to_loss = [loss_pos[i] for i in self.order]          # param position -> loss position
        self.permuted = param_to_loss != list(range(m))
        self.to_param = torch.tensor(param_to_loss, device=dev)
        self.to_loss = torch.empty_like(self.to_param).index_copy_(0, self.to_param, torch.arange(m, device=dev))
        self.by_loss = self.to_loss.cpu().tolist()          # the param position of each loss position
        self.n_shared = self.n_blocks * self.r

    def _init_params(self) -> None:
        """Each member's head initialised from its own generator (seeded by its seed), stacked."""
        cfgs, dev, family = self.cfgs, self.dev, self.family
        self.w0c = self.data.w0.detach().float().cpu()
        b0c = self.data.b0.detach().float().cpu()
        self.gens = [torch.Generator().manual_seed(int(c.seed)) for c in cfgs]
        kinds = [c.kind for c in cfgs]
        inits = [H.init_head(kd, c.init, self.w0c, b0c, g, c.bias_init) for kd, c, g in zip(kinds, cfgs, self.gens)]
        self.names = H.param_names(family)
        self.p = {a: torch.stack([i[0][a] for i in inits]).to(dev) for a in self.names}
        self.buf = {a: torch.stack([i[1][a] for i in inits]).to(dev) for a in inits[0][1]}
        if family == "cosine":
            self.buf["scale"] = torch.tensor([float(c.scale) for c in cfgs], device=dev)
        # the training step leaves out what no member uses (MARC's c * ||w_j|| term, frozen parameters)
        self.tbuf = {a: t for a, t in self.buf.items()
                     if a != "u" or family != "affine" or any(kd.uses_base_norm for kd in kinds)}
        self.need = tuple(a for a in self.names if any(a in kd.trained for kd in kinds))
        s_members = [i for i, kd in enumerate(kinds) if "s" in kd.trained]
        self.s_span = (s_members[0], s_members[-1] + 1) if s_members else None     # s = 1 for the others
        # parameters the training forward needs: s and c are the identity (1, 0) unless trained
        self.pf = {a: t for a, t in self.p.items() if a in self.need or (a in ("W", "b") and not self.base)}

    def _init_losses(self) -> None:
        """The built-in losses stacked (:func:`stack_specs`); forward-only losses get dL/dz by
        autograd, placed into the group's dz (the head backward and the update stay the engine's)."""
        nb, m, dev, counts = self.nb, self.m, self.dev, self.data.class_index.counts
        self.lb = stack_specs([c.loss for c in self.loss_cfgs[:nb]], counts, dev) if nb else None
        self.user = (AutogradLossGrad([c.loss for c in self.loss_cfgs[nb:]], [c.method for c in self.loss_cfgs[nb:]],
                                      counts, dev) if nb < m else None)
        self.user_pos = torch.tensor(self.by_loss[nb:], device=dev, dtype=torch.long)   # their param positions
        self.head_grad: dict = {}

    def _init_inputs(self) -> None:
        """The flat cache rows, the stage-1 layer on the device and, for a frozen-base group,
        the stage-1 logits of every cache row (K numbers per row instead of D), once."""
        data, dev = self.data, self.dev
        self.x_flat = data.x.reshape(self.n * self.n_views, self.d)
        self.w0, self.b0 = data.w0.detach().to(dev, torch.float32), data.b0.detach().to(dev, torch.float32)
        if self.base and data.gather is None:
            self.table = torch.cat([torch.addmm(self.b0, self.x_flat[i:i + 65536].float(), self.w0.t())
                                    for i in range(0, self.x_flat.shape[0], 65536)])
        self.x_dtype = feature_dtype(data.precision)         # of features from a gather source
        self.no_rest = self.x_flat.new_empty((0, self.bsz, self.d))        # every member in a block

    # -- an epoch, a step -----------------------------------------------------------------------

    def prepare_epoch(self, e: int) -> Epoch:
        """Everything epoch ``e``'s steps read (:func:`~ltcache.stage2.epochs.make_epoch`)."""
        return make_epoch(self, e)

    def step(self, ep: Epoch, s: int) -> None:
        """One training step of every member: features -> forward -> loss gradient -> backward
        and SGD-momentum update."""
        xb = self.features(ep, s)
        z, ctx = H.forward_train(self.family, self.pf, self.tbuf, xb, self.base)       # [M, K, B]
        dz = self.loss_grad(ep, s, z, xb)
        self.update(ep, s, ctx, dz)

    def features(self, ep: Epoch, s: int):
        """Step s's inputs: [M, B, D] features, [M, B, K] base logits for a frozen-base group,
        or SharedRows (one gather per block of members on the same rows)."""
        x_flat, bsz, m = self.x_flat, self.bsz, self.m
        if ep.shared:
            rest = (x_flat.index_select(0, ep.shared[1][s]).view(m - self.n_shared, bsz, self.d)
                    if m > self.n_shared else self.no_rest)
            return H.SharedRows(x_flat.index_select(0, ep.shared[0][s]).view(self.n_blocks, bsz, self.d), self.r, rest)
        rows, gather = ep.rows[s], self.data.gather
        if gather is not None:
            xb = gather(rows, ep.valid[s])
            if self.base:
                return torch.addmm(self.b0, xb, self.w0.t()).view(m, bsz, self.k)
            return xb.to(self.x_dtype).view(m, bsz, self.d)
        if self.base:
            return self.table.index_select(0, rows).view(m, bsz, self.k)
        return x_flat.index_select(0, rows).view(m, bsz, self.d)

    def loss_grad(self, ep: Epoch, s: int, z: torch.Tensor, xb=None) -> torch.Tensor:
        """dL/dz [M, K, B] (param order) of every member's loss: analytic for the built-in
        losses (in loss order), through the fallback for the plugin ones (which may read the
        step's features ``xb`` and the head's parameters; the latter's gradient is kept in
        ``self.head_grad`` for :meth:`update`)."""
        lb, targets, permuted, nb = self.lb, ep.targets, self.permuted, self.nb
        if self.user is not None:
            zl = z.index_select(0, self.to_loss) if permuted else z
            dz = torch.empty_like(zl)
            if nb:
                dz[:nb] = batched_loss_grad(zl[:nb], None, None, lb, targets[s])
            u = ep.user
            h = head = None
            if "h" in self.user.reads:
                h = H.dense(xb).index_select(0, self.user_pos)
            if "head" in self.user.reads:
                head = {a: t.index_select(0, self.user_pos) for a, t in self.p.items()}
            dz[nb:] = self.user(zl[nb:], u.y[s], u.valid[s], u.n[s], u.prefix, h=h, head=head)
            self.head_grad = self.user.head_grad
            return dz.index_select(0, self.to_param) if permuted else dz
        if permuted:
            dz = batched_loss_grad(z.index_select(0, self.to_loss), None, None, lb, targets[s])
            return dz.index_select(0, self.to_param)
        return batched_loss_grad(z, None, None, lb, targets[s])

    def update(self, ep: Epoch, s: int, ctx, dz: torch.Tensor) -> None:
        """The head's backward and the SGD-momentum update (:meth:`StackedSGD.update`)."""
        def backward(**fused):
            return H.backward(self.family, self.pf, self.tbuf, ctx, dz, self.need, s_span=self.s_span, **fused)
        self.opt.update(self.p, ep, s, backward, self.head_grad, self.user_pos)

    # -- end of an epoch, end of training -------------------------------------------------------

    def end_epoch(self, e: int) -> None:
        """After epoch ``e``'s last step: the non-finite check, the MaxNorm projection, then val selection."""
        self.sel.check_finite(self.p, e)
        self.opt.project(self.p, e)
        self.sel.choose(self.family, self.p, self.buf, self.data, e)

    def collect(self) -> list[TrainedHead]:
        """Every member's deployable layer (the kept epoch's), in the caller's order."""
        return self.sel.collect(self.family, self.p, self.buf, self.order)
