"""``cb-focal``: the CB repo's sigmoid focal loss (class-balanced-loss (TF), METHODS §14-15).

BCE * exp(-g o z - g log(1 + e^-z)) on the sigmoid form, weighted, / B: an elementwise
modulation of the ``sigmoid`` form (a term of the fused loss, with its gradient here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltcache.stage2.losses import cb_sigmoid  # noqa: F401  (the sigmoid form)
from ltcache.stage2.losses._core import LossSpec, Term, register_loss, register_term
from ltcache.stage2.losses.cb import BETA, class_balanced_weights
from ltcache.stage2.params import Param


def sigmoid_focal_modulate(zt, onehot, bce, c: dict) -> torch.Tensor:
    """exp(-g o zt - g softplus(-zt)) BCE, [m, B, K] (g [m])."""
    g = c["gamma"][:, None, None]
    return torch.exp(-g * onehot * zt - g * F.softplus(-zt)) * bce


def sigmoid_focal_modulate_grad(zs, yi, d, c: dict) -> torch.Tensor:
    """With mod = exp(-g o zs - g softplus(-zs)): d(mod BCE)/dzs = mod (g (sigma(-zs) - o) BCE + d),
    where d = sigma(zs) - o is dBCE/dzs (class-major [m, K, B], g [m, 1, 1])."""
    o = torch.zeros_like(zs).scatter_(1, yi, 1.0)
    g = c["gamma"]
    bce = F.binary_cross_entropy_with_logits(zs, o, reduction="none")
    mod = torch.exp(-g * o * zs - g * F.softplus(-zs))
    return mod * (g * (torch.sigmoid(-zs) - o) * bce + d)


register_term(Term("sigmoid_focal", {"gamma": 0.0}, form="sigmoid", active=lambda c: c["gamma"] > 0,
                   modulate=sigmoid_focal_modulate, modulate_grad=sigmoid_focal_modulate_grad))


@register_loss("cb-focal")
class ClassBalancedFocal:
    """Class-balanced sigmoid focal loss."""

    params = (BETA, Param("gamma", float, lo=0, help="sigmoid focal exponent"))

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), weight=class_balanced_weights(counts, p["beta"]), form="sigmoid",
                        terms={"sigmoid_focal": {"gamma": float(p["gamma"])}})
