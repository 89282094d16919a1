"""``cb``: class-balanced softmax CE (class-balanced-loss (TF) src/cifar_main.py, docs/methods.md#cb)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch

BETA = Param("beta", float, lo=0, hi=1, hi_open=True, default=0.9999, help="class-balanced effective-number beta")


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al.: w_j = (1 - beta) / (1 - beta^n_j), normalised so that sum_j w_j = K."""
    import torch

    n = counts.double()
    if beta <= 0:
        w = torch.ones_like(n)
    else:
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(n)).float()


@register_loss("cb")
class ClassBalanced:
    """sum_i w_{y_i} CE_i / B (tf.losses SUM_BY_NONZERO_WEIGHTS), not PyTorch's weighted mean
    (docs/methods.md#cb)."""

    params = (BETA,)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), weight=class_balanced_weights(counts, p["beta"]))
