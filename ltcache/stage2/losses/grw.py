"""``grw``: generalised re-weighting (MARC official code GRWCrossEntropyLoss, docs/methods.md#marc)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch


def grw_weights(counts: torch.Tensor, rho: float) -> torch.Tensor:
    """Generalised re-weighting (DisAlign/MARC): u_j = pi_j^-rho, normalised to sum K."""
    pi = counts.double() / counts.sum()
    u = pi.pow(-rho)
    return (u / u.sum() * len(pi)).float()


@register_loss("grw")
class GeneralisedReweighting:
    """F.cross_entropy(weight=u): PyTorch's weighted mean."""

    params = (Param("rho", float, lo=0, default=1.2, help="GRW exponent (MARC)"),)

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts), weight=grw_weights(counts, p["rho"]), weighted_mean=True)
