"""``ltwb-cb``: LTWB's PyTorch CB "softmax" (LTWB demo2_second-stage-training.py, docs/methods.md#maxnorm).

F.binary_cross_entropy(softmax(z), onehot, weight=w_y) averaged over B x K -- BCE on softmax
probabilities, not weighted CE: a form of the fused loss (``bce_softmax``), with its gradient here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import Form, LossBatch, LossSpec, LossTargets, register_form, register_loss
from ltcache.stage2.losses.cb import BETA, class_balanced_weights

if TYPE_CHECKING:
    import torch


def bce_softmax_loss(zt, y, onehot, w_y, lb: LossBatch) -> torch.Tensor:
    """w_y mean_k BCE(softmax(zt)_k, o_k), logs clamped at -100 as PyTorch's BCE."""
    import torch

    p = torch.softmax(zt, dim=-1)
    logp1 = torch.log_softmax(zt, dim=-1).clamp_min(-100)
    logp0 = torch.log1p(-p.clamp_max(1.0)).clamp_min(-100)
    bce = -(onehot * logp1 + (1 - onehot) * logp0).mean(-1)
    return w_y * bce


def bce_softmax_grad(zt, t: LossTargets, lb: LossBatch, first: int) -> torch.Tensor:
    """l = -(1/K) sum_k [o_k clamp(log p_k) + (1 - o_k) clamp(log(1 - p_k))]; with
    a_k = o_k [kept] - (1 - o_k) [kept] p_k/(1 - p_k), dl/dzt_j = -(a_j - p_j sum_k a_k) / K.

    log(1 - p) >= -100 exactly where p < 1: below 1, 1 - p is at least the format's epsilon
    (whose log is > -37 even in float64), so the clamp drops exactly the p that round to 1."""
    import torch

    k = zt.shape[1]
    logp = torch.log_softmax(zt, dim=1)
    p = logp.exp()
    a = torch.where(p < 1, p / (p - 1), 0.0)                                        # -(1 - o) ratio off the label
    a.scatter_(1, t.yi, (logp.gather(1, t.yi) >= -100).to(zt.dtype))                 # o [kept] at the label
    d = torch.addcmul(a, p, a.sum(1, keepdim=True), value=-1.0)                      # -(dl/dzt) K
    return d.mul_(t.factor).div_(-k)


register_form(Form("bce_softmax", bce_softmax_loss, bce_softmax_grad))


@register_loss("ltwb-cb")
class LtwbClassBalanced:
    """Class-weighted BCE on the softmax probabilities, averaged over B x K."""

    params = (BETA,)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), weight=class_balanced_weights(counts, p["beta"]),
                        form="bce_softmax")
