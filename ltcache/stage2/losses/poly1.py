"""``poly1``: Poly-1 (Leng et al., PolyLoss, ICLR 2022): L = CE + epsilon (1 - p_y).

The per-sample term epsilon (1 - p_y), p = softmax(z'), is a term of the fused loss; its
gradient: d(1 - p_y)/dz_j = -p_y (1[j = y] - p_j).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossBatch, LossSpec, LossTargets, Term, register_loss, register_term
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


def poly1_loss(zt, y, onehot, c: dict, lb: LossBatch) -> torch.Tensor:
    """epsilon (1 - p_y) per sample, [m, B] (zt [m, B, K], epsilon [m])."""
    import torch

    p_y = torch.softmax(zt, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return c["epsilon"][:, None] * (1 - p_y)


def poly1_grad(zt, t: LossTargets, c: dict, lb: LossBatch) -> torch.Tensor:
    """epsilon p_y (p - e_y) times the batch factor, class-major [m, K, B]."""
    import torch

    p = torch.softmax(zt, dim=1)
    p_y = p.gather(1, t.yi)
    return p.scatter_add_(1, t.yi, torch.full_like(p_y, -1.0)).mul_(p_y * c["epsilon"] * t.factor)


register_term(Term("poly1", {"epsilon": 0.0}, sample_loss=poly1_loss, sample_grad=poly1_grad))


@register_loss("poly1")
class Poly1:
    """Cross-entropy plus epsilon (1 - p_y)."""

    params = (Param("epsilon", float, lo=-1, default=1.0, help="Poly-1 weight of (1 - p_y)"),)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), terms={"poly1": {"epsilon": float(p["epsilon"])}})
