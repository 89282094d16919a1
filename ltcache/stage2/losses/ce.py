"""``ce``: plain cross-entropy (LOS main_stage2.py with delta = 0, cRT, ...)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss

if TYPE_CHECKING:
    import torch


@register_loss("ce")
class CrossEntropy:
    """Cross-entropy on the logits: the softmax form with no term."""

    params = ()

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts))
