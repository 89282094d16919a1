"""``los``: label over-smoothing (LOS main_stage2.py, utils/config.py, docs/methods.md#los)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


@register_loss("los")
class LabelOverSmoothing:
    """CE with label_smoothing delta (delta near 1: the target is almost uniform)."""

    params = (Param("delta", float, lo=0, hi=1, default=0.98, help="LOS label over-smoothing"),)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        import torch

        k = len(counts)
        return LossSpec(num_classes=k, eps=torch.full((k,), float(p["delta"])))
