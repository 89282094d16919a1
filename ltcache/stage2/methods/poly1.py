"""``poly1``: the Poly-1 loss (CE + epsilon (1 - p_y)), from the stage-1 head (docs/methods.md#poly1)."""
from __future__ import annotations

from ltcache.stage2.methods import LOS_CIFAR, linear_dim, register_method, space

register_method("poly1", loss="poly1", presets={"cifar": LOS_CIFAR},
                source="Leng et al., PolyLoss, ICLR 2022 (docs/methods.md#poly1)",
                notes="from the stage-1 head; CE + epsilon (1 - p_y), epsilon = 1 (the paper's default); generic CE budgets (UNVERIFIED)",
                space=space(linear_dim("epsilon", -1.0, 3.0, "epsilon = 1 the Poly-1 default; -1 cancels the first "
                                       "polynomial term of CE (Leng et al.)")))
