"""``las``: MiSLAS label-aware smoothing (MiSLAS config/*/*_stage2_mislas.yaml, docs/methods.md#mislas)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ltcache.errors import LtcacheError
from ltcache.stage2.losses._core import LossSpec, register_loss
from ltcache.stage2.params import Param

if TYPE_CHECKING:
    import torch

SHAPES = ("concave", "linear", "convex")


def label_aware_eps(counts: torch.Tensor, eps_head: float, eps_tail: float,
                    shape: str = "concave") -> torch.Tensor:
    """MiSLAS label-aware smoothing epsilon of each class (``shape`` concave|linear|convex).

    With n_1 = max n, n_K = min n and r = (n_y - n_K) / (n_1 - n_K):
    concave eps_K + (eps_1 - eps_K) sin(pi r / 2); linear eps_K + (eps_1 - eps_K) r;
    convex eps_1 + (eps_1 - eps_K) sin(3 pi / 2 + pi r / 2).
    """
    import torch

    n = counts.double()
    span = (n.max() - n.min()).clamp_min(1e-12)
    r = (n - n.min()) / span
    if shape == "concave":
        eps = eps_tail + (eps_head - eps_tail) * torch.sin(math.pi * r / 2)
    elif shape == "linear":
        eps = eps_tail + (eps_head - eps_tail) * r
    elif shape == "convex":
        eps = eps_head + (eps_head - eps_tail) * torch.sin(1.5 * math.pi + math.pi * r / 2)
    else:
        raise LtcacheError(f"unknown label-aware smoothing shape '{shape}'; use concave, linear or convex")
    return eps.float()


@register_loss("las")
class LabelAwareSmoothing:
    """CE with a per-class smoothing eps_y from eps_head (most frequent) to eps_tail (rarest)."""

    params = (Param("eps_head", float, lo=0, hi=1, help="MiSLAS smoothing of the most frequent class"),
              Param("eps_tail", float, lo=0, hi=1, help="MiSLAS smoothing of the rarest class"),
              Param("shape", str, choices=SHAPES, default="concave", help="MiSLAS smoothing shape"))

    def spec(self, p: dict, counts: torch.Tensor, scale: float = 1.0) -> LossSpec:
        return LossSpec(num_classes=len(counts),
                        eps=label_aware_eps(counts, p["eps_head"], p["eps_tail"], p.get("shape", "concave")))
