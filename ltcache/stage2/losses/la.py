"""``la``: the logit-adjusted loss (google-research logit_adjustment, docs/methods.md#la-loss)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """log pi_j = log(n_j / N), float32 (computed in float64)."""
    import torch

    n = counts.double()
    return torch.log(n / n.sum()).float()


@register_loss("la")
class LogitAdjusted:
    """CE(z + tau log pi)  (the source's +1e-12 omitted)."""

    params = (Param("tau", float, lo=0, default=1.0, help="logit-adjusted loss offset tau (z + tau log pi)"),)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), offset=float(p["tau"]) * log_prior(counts))
