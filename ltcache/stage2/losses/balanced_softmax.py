"""``balanced-softmax``: CE(z + log n) (BALMS config/*/decouple_balanced_softmax*.yaml, docs/methods.md#balanced-softmax)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss

if TYPE_CHECKING:
    import torch


@register_loss("balanced-softmax")
class BalancedSoftmax:
    """Cross-entropy on the logits plus the log class counts."""

    params = ()

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), offset=counts.double().log().float())
