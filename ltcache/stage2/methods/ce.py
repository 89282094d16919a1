"""``ce``: CE re-trained from the stage-1 head, the LOS protocol with delta = 0 (docs/methods.md#ce)."""
from __future__ import annotations

from ltcache.stage2.methods import CRT_IMNET, LOS_CIFAR, LOS_REPO, register_method

register_method("ce", loss="ce", presets={"cifar": LOS_CIFAR, "imagenet": CRT_IMNET},
                source="LOS main_stage2.py with delta=0 (docs/methods.md#ce)",
                notes="CE re-train from the stage-1 head, LOS protocol; ImageNet preset: cRT budget (UNVERIFIED)",
                scripts={"cifar": ("LOS main_stage2.py", LOS_REPO)},
                cache_gap="+0.28 (K=10, 3 seeds)")
