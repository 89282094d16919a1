"""Many / Medium / Few class groups by training count (the OLTR/cRT threshold rule)."""
from __future__ import annotations

from typing import Sequence

GROUPS = ("many", "medium", "few")
MANY_MIN = 101   # many: n_j > 100
FEW_MAX = 19     # few:  n_j < 20; medium: 20 <= n_j <= 100


def group_of(count: int) -> str:
    """The group of one class given its number of training images."""
    if count > 100:
        return "many"
    if count >= 20:
        return "medium"
    return "few"


def shot_groups(class_counts: Sequence[int]) -> list[str]:
    """The group name of every class, in class order."""
    return [group_of(int(c)) for c in class_counts]


def group_sizes(class_counts: Sequence[int]) -> dict[str, int]:
    """How many classes fall in each group."""
    names = shot_groups(class_counts)
    return {g: names.count(g) for g in GROUPS}
