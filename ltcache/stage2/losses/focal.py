"""``focal``: the focal loss in the LDAM-DRW form (LDAM-DRW FocalLoss, docs/methods.md#focal).

CE_w = w_y CE, p = exp(-CE_w), loss (1 - p)^gamma CE_w averaged over the batch: a modulation
of the softmax form's per-sample loss (a term of the fused loss, with its gradient here).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, Term, register_loss, register_term
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


def focal_modulate(loss: torch.Tensor, c: dict) -> torch.Tensor:
    """(1 - e^-l)^gamma l (members with gamma 0 keep l): l [m, B], c["gamma"] [m]."""
    import torch

    g = c["gamma"][:, None]
    mod = torch.where(g > 0, (1 - torch.exp(-loss)).clamp_min(1e-12) ** g, torch.ones_like(loss))
    return mod * loss


def focal_modulate_grad(loss: torch.Tensor, c: dict) -> torch.Tensor:
    """d[(1 - e^-l)^gamma l]/dl = mod + l dmod (0 where the clamp at 1e-12 is active).

    With tc = clamp(1 - e^-l, 1e-12) and pw = tc^(gamma - 1): mod = pw tc and
    dmod = gamma pw e^-l, so the result is pw (tc + gamma l e^-l [not clamped]): one pow, and
    gamma = 0 (a member without the term inside its slice) gives pw tc = 1 with no branch.
    ``c["gamma_m1"]`` (gamma - 1) is made once per group (``derived``); l [m, 1, B]."""
    import torch

    g = c["gamma"]
    gm1 = c["gamma_m1"] if "gamma_m1" in c else g - 1
    el = torch.exp(-loss)
    tt = 1 - el
    tc = tt.clamp_min(1e-12)
    pw = tc.pow(gm1)
    le = torch.mul(loss, el).mul_(tt >= 1e-12)                      # l e^-l, 0 under the clamp
    return torch.addcmul(tc, le, g).mul_(pw)


register_term(Term("focal", {"gamma": 0.0}, form="softmax", active=lambda c: c["gamma"] > 0,
                   modulate=focal_modulate, modulate_grad=focal_modulate_grad,
                   derived=lambda c, lb: {"gamma_m1": c["gamma"] - 1}))


@register_loss("focal")
class Focal:
    """(1 - p)^gamma CE with p = exp(-CE)."""

    params = (Param("gamma", float, lo=0, default=1.0, help="focal exponent"),)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), terms={"focal": {"gamma": float(p["gamma"])}})
