"""The executable specification of a stage-2 recipe: one configuration trained by a plain loop.

:func:`train_reference` trains one :class:`~ltcache.stage2.plan.Config` the way the sources'
stage-2 scripts do (in the spirit of torchvision's ``references/classification/train.py``):
an ``nn.Module`` head, autograd, ``torch.optim.SGD`` with one parameter group per trained
parameter (its lr factor; weight decay 0 where the recipe exempts it), the
``CosineAnnealingLR`` scheduler stepped where the method's script steps it (at the start of
each epoch for ``cosine-start``: cRT, BALMS, BagofTricks, LTWB; after it for ``cosine``: LOS,
MiSLAS), each epoch cut after the number of batches the script's loop runs (int(N/B),
ceil(N/B), ceil(N/B) + 1), the progressive sampler's weight ``np.linspace(0, 1, E)[e]`` and
LTWB's MaxNorm projection after each epoch.

It is slow (one configuration, Python per step) and exists to be compared with: the batched
engine (:mod:`ltcache.stage2.sweep`) must give the same head on the same batches and the same
initialisation (``tests/test_stage2_reference.py`` checks every registered method at each of its
presets), so a recipe field the engine ignored would fail there. The two share only the
sampler's draws (:func:`~ltcache.stage2.samplers.epoch_indices`, here told the batch count and
the progressive weight computed below) and the loss definition (the registered loss's forward,
or :func:`~ltcache.stage2.losses.batched_loss` for the built-in ones).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltcache.stage2 import heads as H
from ltcache.stage2.losses import _core as L
from ltcache.stage2.plan import Config, TrainData
from ltcache.stage2.samplers import DEFAULT_STEPS, epoch_samples, epoch_indices


class ReferenceHead(nn.Module):
    """A head as an ``nn.Module``: affine z = s (x W^T + b) + c u (linear, LWS, MiSLAS, MARC) or
    cosine z = scale <x/||x||, w_j/||w_j||>; the untrained parameters are frozen."""

    def __init__(self, cfg: Config, w0: torch.Tensor, b0: torch.Tensor, g: torch.Generator):
        super().__init__()
        self.kind = H.get_head(cfg.head)
        k, d = w0.shape
        if self.kind.plugin is not None:                       # a plugin head: its own init and forward
            p, buf = H.init_head(self.kind, cfg.init, w0, b0, g)
            self.plugin = nn.ParameterDict({a: nn.Parameter(t) for a, t in p.items()})
            self.plugin_buf = buf
            return
        # the initial values, drawn from the configuration's generator in the engine's order
        if self.kind.family == "cosine":                       # NormedLinear: uniform(-1, 1), unit rows
            w = torch.rand(k, d, generator=g) * 2 - 1
            self.W = nn.Parameter(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12))
            self.scale = float(cfg.scale)
            return
        if cfg.init == "fresh":                                # nn.Linear's default init
            bound = 1.0 / math.sqrt(d)
            w = (torch.rand(k, d, generator=g) * 2 - 1) * bound
            b = (torch.rand(k, generator=g) * 2 - 1) * bound
        else:                                                  # the stage-1 classifier
            w, b = w0.clone().float(), b0.clone().float()
        if cfg.bias_init is not None:                          # the CB repo's sigmoid bias -log(K-1)
            b = torch.full((k,), float(cfg.bias_init))
        trained = self.kind.trained
        self.W = nn.Parameter(w, requires_grad="W" in trained)
        self.b = nn.Parameter(b, requires_grad="b" in trained)
        self.s = nn.Parameter(torch.ones(k), requires_grad="s" in trained)
        self.c = nn.Parameter(torch.zeros(k), requires_grad="c" in trained)
        self.register_buffer("u", w0.norm(dim=1).float() if self.kind.uses_base_norm else torch.zeros(k))

    def params(self) -> dict:
        """The head's parameters by name (what a loss reading ``head=`` sees)."""
        return dict(self.plugin) if self.kind.plugin is not None else dict(self.named_parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind.plugin is not None:
            p = {a: t.unsqueeze(0) for a, t in self.plugin.items()}
            return self.kind.plugin.forward(p, {a: t.unsqueeze(0) for a, t in self.plugin_buf.items()}, x.unsqueeze(0))[0]
        if self.kind.family == "cosine":
            return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.W, dim=-1).t()
        return self.s * (x @ self.W.t() + self.b) + self.c * self.u

    def layer(self) -> dict:
        """The trained head as a deployable layer (:func:`ltcache.stage2.heads.effective`)."""
        if self.kind.plugin is not None:
            return H.effective(self.kind.family, {a: t.detach().clone() for a, t in self.plugin.items()},
                               self.plugin_buf)
        if self.kind.family == "cosine":
            return {"kind": "cosine", "weight": self.W.detach().clone(), "scale": self.scale}
        return {"kind": "linear", "weight": (self.s.unsqueeze(1) * self.W).detach(),
                "bias": (self.s * self.b + self.c * self.u).detach()}


def script_batches(rule: str, n: int, batch_size: int, samples: int) -> int:
    """Batches one epoch of the script's loop runs: ``floor`` ``for step, ... : if step ==
    int(N / B): break`` (cRT, BALMS) or ``drop_last=True`` (BagofTricks); ``ceil`` a
    ``DataLoader(drop_last=False)``; ``ceil+1`` MiSLAS's ``if i > ceil(N / B): break``; never more
    than the sampler's epoch of ``samples`` draws holds."""
    want = {"floor": n // batch_size, "ceil": -(-n // batch_size), "ceil+1": -(-n // batch_size) + 1}[rule]
    return max(1, min(want, -(-samples // batch_size)))


def _loss_fn(cfg: Config, counts: torch.Tensor):
    """(logits [B, K], labels [B], features [B, D], head parameters) -> the mean loss: the
    registered loss's definition (a plugin forward reads the features / parameters it names)."""
    unit = L.get_loss(cfg.loss.user) if cfg.loss.user is not None else None
    if unit is not None and unit.forward is not None:
        def user(z, y, h, head):
            kw = {r: v for r, v in (("h", h), ("head", head)) if r in unit.reads}
            return unit.forward(z, y, cfg.loss.user_params, counts.float(), **kw)
        return user
    lb = L.stack_specs([cfg.loss], counts, "cpu")
    return lambda z, y, h, head: L.batched_loss(z.unsqueeze(0), y.unsqueeze(0), torch.ones(1, len(y)), lb)[0]


def train_reference(cfg: Config, data: TrainData) -> dict:
    """Train ``cfg`` on ``data`` (its train views; CPU, float32) with a plain PyTorch loop; the
    final head as a deployable layer. Only ``select="last"`` (the head after the last epoch)."""
    x, labels = data.x.detach().cpu().float(), data.labels.cpu()
    ci = data.class_index
    n, n_views, _ = x.shape
    counts = ci.counts
    g = torch.Generator().manual_seed(int(cfg.seed))
    head = ReferenceHead(cfg, data.w0.detach().cpu().float(), data.b0.detach().cpu().float(), g)

    # SGD, one group per trained parameter: lr x its factor (MiSLAS: W, b at lr_factor), weight
    # decay unless the recipe exempts it (the CB repo's bias)
    groups = [{"params": [p], "lr": cfg.lr * (cfg.lr_factor if name in head.kind.slow else 1.0),
               "weight_decay": 0.0 if name in cfg.no_wd else cfg.wd}
              for name, p in head.params().items() if p.requires_grad]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=0.0)
             if cfg.schedule != "constant" else None)
    loss_fn = _loss_fn(cfg, counts)
    rule = cfg.steps or DEFAULT_STEPS[cfg.sampler]
    batches = script_batches(rule, n, cfg.batch_size, epoch_samples(cfg.sampler, ci))
    lams = np.linspace(0, 1, cfg.epochs)                       # cRT ClassPrioritySampler, cycle 0
    radius = None
    if cfg.maxnorm_thresh is not None:                         # LTWB MaxNorm_via_PGD.setPerLayerThresh
        norms = data.w0.detach().cpu().double().norm(dim=1)
        radius = float(norms.min() + cfg.maxnorm_thresh * (norms.max() - norms.min()))

    for epoch in range(cfg.epochs):
        if sched is not None and cfg.schedule == "cosine-start":
            with warnings.catch_warnings():                    # the scripts step before optimizer.step()
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
        idx, valid = epoch_indices(cfg.sampler, ci, cfg.batch_size, epoch, cfg.epochs, g,
                                   steps=batches, lam=float(lams[epoch]))
        view = torch.randint(n_views, (n,), generator=g) if n_views > 1 else torch.zeros(n, dtype=torch.long)
        for step in range(idx.shape[0]):
            i = idx[step][valid[step]]
            xi = x[i, view[i]]
            loss = loss_fn(head(xi), labels[i], xi, head.params())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if radius is not None:                                 # PGD after the epoch: rows longer than r -> r
            with torch.no_grad():
                head.W.mul_((radius / head.W.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
        if sched is not None and cfg.schedule == "cosine":
            sched.step()
    return head.layer()
