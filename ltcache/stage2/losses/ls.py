"""``ls``: label smoothing (PyTorch ``F.cross_entropy(label_smoothing=eps)``, docs/methods.md#ls)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


@register_loss("ls")
class LabelSmoothing:
    """CE against q = (1 - eps) e_y + eps / K."""

    params = (Param("eps", float, lo=0, hi=1, default=0.1, help="label smoothing"),)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        import torch

        k = len(counts)
        return LossSpec(num_classes=k, eps=torch.full((k,), float(p["eps"])))
