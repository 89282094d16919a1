"""``ldam-drw``: LDAM with deferred re-weighting (LDAM-DRW losses.py, cifar_train.py, docs/methods.md#ldam-drw).

DRW on cached features = CB weights (beta) for the whole re-training, PyTorch
F.cross_entropy(weight=) normalisation by sum_i w_{y_i}.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.losses.cb import BETA, class_balanced_weights
from ltcache.stage2.losses.ldam import MARGIN, ldam_margins

if TYPE_CHECKING:
    import torch


@register_loss("ldam-drw")
class LDAMDRW:
    """LDAM margins, class-balanced weights, weighted mean."""

    params = (MARGIN, BETA)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), margin=ldam_margins(counts, p["margin"]) * scale,
                        weight=class_balanced_weights(counts, p["beta"]), weighted_mean=True)
