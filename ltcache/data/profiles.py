"""Long-tailed class-count profiles and the rules that pick which images a class keeps."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ltcache.errors import LtcacheError

PROFILES = ("exp", "step")
SELECTIONS = ("first", "shuffle")


def lt_counts(n_max: int, num_classes: int, imb_ratio: float, profile: str = "exp") -> list[int]:
    """Images kept per class: exp n_i = floor(n_max * (1/IR)^(i/(K-1))); step: half the
    classes at n_max, the other half at floor(n_max/IR)."""
    if imb_ratio < 1:
        raise LtcacheError(f"imbalance ratio must be >= 1 (got {imb_ratio}); use 1 for a balanced "
                           "training set, 100 for the usual CIFAR-LT setting")
    if profile not in PROFILES:
        raise LtcacheError(f"unknown profile '{profile}'; use one of: {', '.join(PROFILES)}")
    k = int(num_classes)
    if profile == "exp":
        if k == 1:
            return [int(n_max)]
        return [int(n_max * (1.0 / imb_ratio) ** (i / (k - 1.0))) for i in range(k)]
    half = k // 2
    return [int(n_max)] * (k - half) + [int(n_max / imb_ratio)] * half


def select_indices(labels: Sequence[int], counts: Sequence[int], rule: str = "shuffle",
                   seed: int = 0) -> np.ndarray:
    """Source indices kept by the long-tailed profile, class by class in class order.

    ``first``: the first n_i images of class i in source order (LOS, LTWB).
    ``shuffle``: one RNG seeded once with ``seed``; for each class in class order its indices
    are shuffled, then the first n_i kept (LDAM-DRW, MiSLAS: ``np.random.seed(0)`` then
    ``np.random.shuffle`` per class; ``RandomState(seed)`` draws the same stream).
    """
    if rule not in SELECTIONS:
        raise LtcacheError(f"unknown selection rule '{rule}'; use one of: {', '.join(SELECTIONS)}")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed) if rule == "shuffle" else None
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if n <= 0:
            raise LtcacheError(f"the long-tailed profile leaves class {c} with {n} images; "
                               "lower the imbalance ratio")
        if len(idx) < n:
            raise LtcacheError(f"class {c} has {len(idx)} training images but the profile asks "
                               f"for {n}; lower the imbalance ratio or use a larger dataset")
        if rng is not None:
            rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep).astype(np.int64)


def draw_validation(labels: Sequence[int], selected: np.ndarray, per_class: int,
                    seed: int = 0, class_names: Sequence[str] | None = None) -> tuple[np.ndarray, list]:
    """A balanced val split of ``per_class`` images per class, drawn (seeded) from the training
    images the profile did NOT select, so val never overlaps train or test.

    A class with fewer spare images (CIFAR-10-LT class 0 keeps all 5,000 of its images) gets
    the smaller share it has, possibly none; those classes are returned so callers can say so,
    and val accuracies average over the classes present.
    """
    labels = np.asarray(labels)
    if per_class < 0:
        raise LtcacheError(f"--val-per-class must be >= 0 (got {per_class})")
    if per_class == 0:
        return np.zeros(0, dtype=np.int64), []
    unused = np.ones(len(labels), dtype=bool)
    unused[selected] = False
    rng = np.random.RandomState(seed + 1)
    out, short = [], []
    for c in range(int(labels.max()) + 1):
        pool = np.where(unused & (labels == c))[0]
        if len(pool) < per_class:
            short.append((class_names[c] if class_names is not None else str(c), len(pool)))
        take = min(per_class, len(pool))
        out.append(np.sort(rng.choice(pool, take, replace=False)))
    idx = np.concatenate(out).astype(np.int64)
    if len(idx) == 0:
        raise LtcacheError("no training image is left over for a validation split; use "
                           "--val-per-class 0 or a dataset with a val/ folder")
    return idx, short
