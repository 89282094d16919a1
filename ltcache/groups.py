"""Many / Medium / Few class groups by training count (the OLTR/cRT threshold rule)."""
from __future__ import annotations

from typing import Sequence

GROUPS = ("many", "medium", "few")


def group_of(count: int) -> str:
    """The group of one class given its number of training images (many: n > 100; medium:
    20 <= n <= 100; few: n < 20)."""
    if count > 100:
        return "many"
    if count >= 20:
        return "medium"
    return "few"


def shot_groups(class_counts: Sequence[int]) -> list[str]:
    """The group name of every class, in class order."""
    return [group_of(int(c)) for c in class_counts]
