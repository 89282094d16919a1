"""``los``: label over-smoothing, from the stage-1 head (docs/methods.md#los)."""
from __future__ import annotations

from ltcache.stage2.methods import LOS_CIFAR, LOS_REPO, linear_dim, register_method, space

register_method("los", loss="los", presets=LOS_CIFAR,
                source="LOS main_stage2.py, utils/config.py (docs/methods.md#los)",
                notes="from the stage-1 head; CE with label_smoothing delta; ImageNet values not in the repo: CIFAR values (UNVERIFIED)",
                scripts=("LOS main_stage2.py", LOS_REPO),
                space=space(linear_dim("delta", 0.0, 0.99, "0.98 at K = 100 (docs/methods.md#los); the target q_y = 1 - delta (K-1)/K "
                                       "flattens faster at small K, so the range reaches down to plain CE")),
                cache_gap="-0.14 (K=10, 3 seeds)")
