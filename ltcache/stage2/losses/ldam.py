"""``ldam``: label-distribution-aware margins (LDAM-DRW losses.py, docs/methods.md#ldam)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch

MARGIN = Param("margin", float, lo=0, default=0.5, help="LDAM largest margin")


def ldam_margins(counts: torch.Tensor, max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins m_j = C / n_j^(1/4) scaled so that max_j m_j = max_m."""
    m = 1.0 / counts.double().pow(0.25)
    return (m * (max_m / m.max())).float()


@register_loss("ldam")
class LDAM:
    """CE(s (cos - m_y e_y)): the margin is subtracted before the cosine head's scale."""

    params = (MARGIN,)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), margin=ldam_margins(counts, p["margin"]) * scale)
