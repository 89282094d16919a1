"""``focal``: the focal loss (LDAM-DRW form), from the stage-1 head (docs/methods.md#focal)."""
from __future__ import annotations

from ltcache.stage2.methods import UNVERIFIED, linear_dim, register_method, space

register_method("focal", loss="focal",
                source="LDAM-DRW FocalLoss (docs/methods.md#focal)", notes="from the stage-1 head; (1-p)^gamma CE, p = exp(-CE); " + UNVERIFIED,
                space=space(linear_dim("gamma", 0.0, 3.0, "gamma = 1 (LDAM-DRW), 2 (original focal) (docs/methods.md#focal)")))
