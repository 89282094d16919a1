"""``seesaw``: Seesaw loss (mmdet seesaw_loss.py, docs/methods.md#seesaw) with static class counts.

A shift of z' off the label by log M_yj + log C_yj, a function of the detached logits (a term
of the fused loss; it has no gradient of its own). Static counts instead of mmdet's cumulative
counts (docs/methods.md#seesaw).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossBatch, LossSpec, Term, register_loss, register_term
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch

SEESAW_EPS = 1e-2  # mmdet default


def seesaw_shift(z: torch.Tensor, yi: torch.Tensor, c: dict, lb: LossBatch, dim: int) -> torch.Tensor:
    """log M_yj + log C_yj added to the logits j != y (mmdet seesaw_ce_loss), with
    M_yj = (n_j / n_y)^p if n_j < n_y, C_yj = (sigma_j / max(sigma_y, eps))^q if > 1 and
    sigma = softmax of the detached raw logits; p = q = 0 gives 0.

    Either layout: ``dim`` is the class dimension of z, yi holds the labels with a size-1
    class dimension; p and q broadcast against z ([M] definition coefficients are reshaped).
    """
    import torch

    p, q = c["p"], c["q"]
    if p.dim() == 1:
        p, q = p[:, None, None], q[:, None, None]
    log_counts = lb.log_counts3 if dim == 1 else lb.log_counts.view([-1 if i == dim % 3 else 1 for i in range(3)])
    log_m = (log_counts - lb.log_counts.take(yi)).clamp_max_(0).mul_(p)
    logsig = torch.log_softmax(z.detach() if z.requires_grad else z, dim=dim)
    log_c = (logsig - logsig.gather(dim, yi).clamp_min_(math.log(SEESAW_EPS))).clamp_min_(0).mul_(q)
    # both vanish at the label (log_counts_y - log_counts_y = 0; logsig_y - max(logsig_y, .) <= 0
    # clamped to 0), exactly, so the label needs no scatter of 0
    return log_m.add_(log_c)


register_term(Term("seesaw", {"p": 0.0, "q": 0.0}, active=lambda c: bool(c["p"] or c["q"]), shift=seesaw_shift))


@register_loss("seesaw")
class Seesaw:
    """CE on logits shifted by the mitigation (p) and compensation (q) factors."""

    params = (Param("p", float, lo=0, default=0.8, help="Seesaw mitigation exponent"),
              Param("q", float, lo=0, default=2.0, help="Seesaw compensation exponent"))

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), terms={"seesaw": {"p": float(p["p"]), "q": float(p["q"])}})
