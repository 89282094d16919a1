"""``vs``: vector-scaling loss (VS-Loss class_imbalance/losses.py, docs/methods.md#vs)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.losses.la import log_prior
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


@register_loss("vs")
class VectorScaling:
    """CE(z (n / n_max)^gamma + tau log pi)."""

    params = (Param("gamma", float, lo=0, default=0.3, help="VS multiplicative exponent"),
              Param("tau", float, lo=0, default=1.0, help="VS additive (logit adjustment) tau"))

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        n = counts.double()
        return LossSpec(num_classes=len(counts), mult=(n / n.max()).pow(float(p["gamma"])).float(),
                        offset=float(p["tau"]) * log_prior(counts))
