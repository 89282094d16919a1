"""SGD with momentum of M stacked heads, one hand-written batched update per step.

PyTorch SGD semantics (dampening 0, no Nesterov): g += wd * p; buf = mu * buf + g (buf = g on
the first step: the buffers start at zero); p -= lr * buf; wd is 0 on a member's ``no_wd``
parameters, lr x ``lr_factor`` on its head's slow parameters (MiSLAS W, b), 0 on the frozen
ones. The per-step factors (who is active, its lr) come from the epoch
(:mod:`ltcache.stage2.epochs`); the MaxNorm projection (LTWB) runs once per epoch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ltcache.stage2.heads import HeadKind
from ltcache.stage2.plan import Config


def maxnorm_radius(w0: torch.Tensor, thresh: float) -> float:
    """LTWB ``MaxNorm_via_PGD.setPerLayerThresh`` on the stage-1 weights:
    r = min_j ||w_j|| + thresh * (max_j ||w_j|| - min_j ||w_j||)."""
    norms = w0.double().norm(dim=1)
    return float(norms.min() + thresh * (norms.max() - norms.min()))


def _lr_mult(kd: HeadKind, c: Config, a: str) -> float:
    if a not in kd.trained:
        return 0.0
    return c.lr_factor if a in kd.slow else 1.0


class StackedSGD:
    """Per-member SGD-momentum settings as tensors, the momentum buffers of the trained
    parameters ``need`` and the MaxNorm radii."""

    def __init__(self, cfgs: Sequence[Config], p: dict, need: tuple, last_steps: list, w0: torch.Tensor,
                 dev: torch.device) -> None:
        m = len(cfgs)
        self.cfgs, self.need, self.dev = cfgs, need, dev
        self.shape = {a: (m,) + (1,) * (t.dim() - 1) for a, t in p.items()}
        self.lrm = {a: torch.tensor([_lr_mult(c.kind, c, a) for c in cfgs], device=dev) for a in need}
        # weight decay per parameter: 0 on a member's ``no_wd`` parameters (the CB repo's sigmoid bias)
        self.wd = {a: torch.tensor([0.0 if a in c.no_wd else c.wd for c in cfgs], device=dev).view(self.shape[a])
                   for a in need}
        self.any_wd = any(c.wd for c in cfgs)
        self.mom = torch.tensor([c.momentum for c in cfgs], device=dev)
        self.mbuf = {a: torch.zeros_like(p[a]) for a in need}
        self.uniform_mom = len({c.momentum for c in cfgs}) == 1
        self.momentum = float(cfgs[0].momentum)
        # the last (epoch, step) at which each member trains: after it, a member's momentum buffer
        # no longer matters, so a step whose only inactive members are finished can use the fused
        # update (one momentum factor for all); a member paused mid-run needs the masked update.
        self.last = [(c.epochs - 1, s - 1) for c, s in zip(cfgs, last_steps)]
        self.use_maxnorm = any(c.maxnorm_thresh is not None for c in cfgs)
        if self.use_maxnorm:
            self.radius = torch.tensor([maxnorm_radius(w0, c.maxnorm_thresh) if c.maxnorm_thresh is not None
                                        else float("inf") for c in cfgs], device=dev).view(m, 1)

    def update(self, p: dict, ep, s: int, backward: Callable, head_grad: dict, user_pos: torch.Tensor) -> None:
        """Step ``s`` of epoch ``ep``: ``backward(**kw)`` is the head's backward (into the momentum
        buffers when every member shares one momentum and none pauses); ``head_grad``: a plugin
        loss's own gradient of the head parameters, for the members at ``user_pos``."""
        mbuf, wd, neg_lr, any_wd = self.mbuf, self.wd, ep.neg_lr, self.any_wd
        if self.uniform_mom and not ep.paused[s]:
            # fused: mbuf = mu mbuf + grad (+ wd p); finished members get lr 0
            backward(into=mbuf, beta=self.momentum)
            for a in self.need:
                if a in head_grad:                 # a plugin loss's own gradient of the head parameters
                    mbuf[a].index_add_(0, user_pos, head_grad[a])
                if any_wd:
                    mbuf[a].addcmul_(p[a], wd[a])
                p[a].addcmul_(mbuf[a], neg_lr[a][s])
        else:
            grads = backward()
            c_mom, act_v = ep.c_mom, ep.act
            for a in self.need:
                g = grads[a]
                if a in head_grad:
                    g.index_add_(0, user_pos, head_grad[a])
                if any_wd:
                    g.addcmul_(p[a], wd[a])
                mbuf[a].mul_(c_mom[a][s]).addcmul_(g, act_v[a][s])
                p[a].addcmul_(mbuf[a], neg_lr[a][s])

    def project(self, p: dict, e: int) -> None:
        """LTWB PGD after epoch ``e``'s last batch: rows with ||w_j|| > r -> w_j r/||w_j||
        (members still training only)."""
        if not self.use_maxnorm:
            return
        live = torch.tensor([e < c.epochs for c in self.cfgs], device=self.dev).view(len(self.cfgs), 1)
        norms = p["W"].norm(dim=-1)
        factor = torch.where(live, (self.radius / norms.clamp_min(1e-12)).clamp(max=1.0), torch.ones_like(norms))
        p["W"].mul_(factor.unsqueeze(-1))
