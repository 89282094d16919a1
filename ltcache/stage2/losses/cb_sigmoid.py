"""``cb-sigmoid``: the CB repo's sigmoid form (class-balanced-loss (TF), docs/methods.md#cb-sigmoid).

l = sum_k BCE(z'_k, 1[k = y]) per sample, weighted by w_y, / B: a form of the fused loss
(``sigmoid``), with its gradient here. Its elementwise modulating terms (cb-focal) plug in
through ``modulate(zt, onehot, bce, c)`` / ``modulate_grad(zs, yi, d, c)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import (Form, LossBatch, LossSpec, LossTargets, register_form, register_loss,
                                         within)
from ltcache.stage2.losses.cb import BETA, class_balanced_weights

if TYPE_CHECKING:
    import torch


def sigmoid_loss(zt, y, onehot, w_y, lb: LossBatch) -> torch.Tensor:
    """w_y sum_k BCE(zt_k, o_k), each BCE modulated by the sigmoid form's terms."""
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(zt, onehot, reduction="none")
    for term in lb.modulators["sigmoid"]:
        bce = term.modulate(zt, onehot, bce, lb.coef[term.name])
    return w_y * bce.sum(-1)


def sigmoid_grad(zt, t: LossTargets, lb: LossBatch, first: int) -> torch.Tensor:
    """dl/dzt = sigma(zt) - o, then each modulating term on the members it covers."""
    import torch

    m = zt.shape[0]
    d = torch.sigmoid(zt).scatter_add_(1, t.yi, lb.filled(-1.0, t.yi.shape, zt.dtype))
    for term in lb.modulators["sigmoid"]:
        a, e = within(lb.ranges[term.name], first, m)
        if a < e:
            ds = d[a:e]
            ds.copy_(term.modulate_grad(zt[a:e], t.yi[a:e], ds, lb.coef_slice(term.name, first + a, first + e)))
    return d.mul_(t.factor)


register_form(Form("sigmoid", sigmoid_loss, sigmoid_grad))


@register_loss("cb-sigmoid")
class ClassBalancedSigmoid:
    """sum_{i,j} w_{y_i} BCE(z_ij, 1[j = y_i]) / B."""

    params = (BETA,)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), weight=class_balanced_weights(counts, p["beta"]), form="sigmoid")
