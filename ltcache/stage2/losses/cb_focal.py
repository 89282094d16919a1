"""``cb-focal``: the CB repo's sigmoid focal loss (class-balanced-loss (TF), docs/methods.md#cb-focal).

BCE * exp(-g o z - g log(1 + e^-z)) on the sigmoid form, weighted, / B: an elementwise
modulation of the ``sigmoid`` form (a term of the fused loss, with its gradient here).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses import cb_sigmoid  # noqa: F401  (the sigmoid form)
from ltcache.stage2.losses._core import LossSpec, Term, register_loss, register_term
from ltcache.stage2.losses.cb import BETA, class_balanced_weights
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


def sigmoid_focal_modulate(zt, onehot, bce, c: dict) -> torch.Tensor:
    """exp(-g o zt - g softplus(-zt)) BCE, [m, B, K] (g [m])."""
    import torch
    import torch.nn.functional as F

    g = c["gamma"][:, None, None]
    return torch.exp(-g * onehot * zt - g * F.softplus(-zt)) * bce


def sigmoid_focal_modulate_grad(zs, yi, d, c: dict) -> torch.Tensor:
    """With mod = exp(-g o zs - g softplus(-zs)): d(mod BCE)/dzs = mod (g (sigma(-zs) - o) BCE + d),
    where d = sigma(zs) - o is dBCE/dzs (class-major [m, K, B], g [m, 1, 1]).

    Written with u = (1 - 2o) zs (the logit turned away from the target): BCE = -logsigmoid(-u),
    mod = exp(g logsigmoid(u)) and sigma(-zs) - o = (1 - 2o) sigma(-u), so
    result = mod (d - g (1 - 2o) sigma(-u) logsigmoid(-u)). One logsigmoid serves both, by
    logsigmoid(-u) = logsigmoid(u) - u (the subtraction loses digits only for u << 0, where
    mod = sigma(u)^g ~ 0 scales the term away) and sigma(-u) = exp(logsigmoid(-u)); no log of a
    probability that could round to 0."""
    import torch
    import torch.nn.functional as F

    g = c["gamma"]
    sgn = torch.ones_like(zs).scatter_(1, yi, -1.0)                        # 1 - 2o
    u = zs * sgn
    ls = F.logsigmoid(u)
    mod = torch.mul(ls, g).exp_()
    lpt = ls.sub_(u)                                                       # logsigmoid(-u) = -BCE
    r = torch.exp(lpt).mul_(lpt).mul_(sgn)                                # (sigma(-zs) - o) (-BCE)
    return torch.addcmul(d, r, g, value=-1.0).mul_(mod)


register_term(Term("sigmoid_focal", {"gamma": 0.0}, form="sigmoid", active=lambda c: c["gamma"] > 0,
                   modulate=sigmoid_focal_modulate, modulate_grad=sigmoid_focal_modulate_grad))


@register_loss("cb-focal")
class ClassBalancedFocal:
    """Class-balanced sigmoid focal loss."""

    params = (BETA, Param("gamma", float, lo=0, default=1.0, help="sigmoid focal exponent"))

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), weight=class_balanced_weights(counts, p["beta"]), form="sigmoid",
                        terms={"sigmoid_focal": {"gamma": float(p["gamma"])}})
