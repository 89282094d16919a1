"""``focal``: the focal loss in the LDAM-DRW form (LDAM-DRW FocalLoss, METHODS §14).

CE_w = w_y CE, p = exp(-CE_w), loss (1 - p)^gamma CE_w averaged over the batch: a modulation
of the softmax form's per-sample loss (a term of the fused loss, with its gradient here).
"""
from __future__ import annotations

import torch

from ltcache.stage2.losses._core import LossSpec, Term, register_loss, register_term
from ltcache.stage2.params import Param


def focal_modulate(loss: torch.Tensor, c: dict) -> torch.Tensor:
    """(1 - e^-l)^gamma l (members with gamma 0 keep l): l [m, B], c["gamma"] [m]."""
    g = c["gamma"][:, None]
    mod = torch.where(g > 0, (1 - torch.exp(-loss)).clamp_min(1e-12) ** g, torch.ones_like(loss))
    return mod * loss


def focal_modulate_grad(loss: torch.Tensor, c: dict) -> torch.Tensor:
    """d[(1 - e^-l)^gamma l]/dl = mod + l dmod (0 where the clamp at 1e-12 is active)."""
    g = c["gamma"]
    el = torch.exp(-loss)
    tt = 1 - el
    tc = tt.clamp_min(1e-12)
    on = g > 0
    mod = torch.where(on, tc ** g, torch.ones_like(loss))
    dmod = torch.where(on & (tt >= 1e-12), g * tc ** (g - 1) * el, torch.zeros_like(loss))
    return mod + loss * dmod


register_term(Term("focal", {"gamma": 0.0}, form="softmax", active=lambda c: c["gamma"] > 0,
                   modulate=focal_modulate, modulate_grad=focal_modulate_grad))


@register_loss("focal")
class Focal:
    """(1 - p)^gamma CE with p = exp(-CE)."""

    params = (Param("gamma", float, lo=0, help="focal exponent"),)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), terms={"focal": {"gamma": float(p["gamma"])}})
