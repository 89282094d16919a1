"""Long-tailed class-count profiles and the rules that pick which images a class keeps."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ltcache.errors import LtcacheError
from ltcache.options import PROFILES, SELECTIONS



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


VAL_RULES = ("holdout", "leftover")
VAL_TARGET_IMAGES = 1000     # auto val size: 20 per class, or enough classes' worth for 1,000 images


def default_val_per_class(num_classes: int, smallest_class: int | None = None) -> int:
    """The default val size per class: 20 (the ImageNet-LT / Places-LT val lists), raised so
    that val holds at least 1,000 images (CIFAR-10: 100 per class), and at most a tenth of the
    smallest class's source images (at least 1). The standard error of a val accuracy near
    75 % is about sqrt(0.75 * 0.25 / n): 3.1 points at 200 images, 1.4 at 1,000."""
    n = max(20, -(-VAL_TARGET_IMAGES // max(1, int(num_classes))))
    if smallest_class is not None:
        n = min(n, max(1, int(smallest_class) // 10))
    return n


def _class_order(labels: np.ndarray, rule: str, seed: int) -> list:
    """Each class's source indices in the order the selection rule takes them."""
    rng = np.random.RandomState(seed) if rule == "shuffle" else None
    out = []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        idx = np.where(labels == c)[0]
        if rng is not None:
            rng.shuffle(idx)
        out.append(idx)
    return out


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
    order = _class_order(labels, rule, seed)
    keep = []
    for c, n in enumerate(counts):
        idx = order[c] if c < len(order) else np.zeros(0, dtype=np.int64)
        if n <= 0:
            raise LtcacheError(f"the long-tailed profile leaves class {c} with {n} images; "
                               "lower the imbalance ratio")
        if len(idx) < n:
            raise LtcacheError(f"class {c} has {len(idx)} training images but the profile asks "
                               f"for {n}; lower the imbalance ratio or use a larger dataset")
        keep.append(idx[:n])
    return np.concatenate(keep).astype(np.int64)


def holdout_then_select(labels: Sequence[int], counts: Sequence[int], per_class: int, rule: str = "shuffle",
                        seed: int = 0, class_names: Sequence[str] | None = None
                        ) -> tuple[np.ndarray, np.ndarray, list]:
    """A balanced val split held out of the FULL training set before the profile draws from the
    rest: (train indices, val indices, train counts).

    Each class's images are ordered as the selection rule takes them (source order for
    ``first``, the papers' seeded shuffle for ``shuffle``); val is the last ``per_class`` of that
    order and train the first min(n_i, available - per_class). So every class has val images,
    val never overlaps train, and every class the profile does not take in full keeps exactly
    the papers' images; a class it takes in full (CIFAR-10-LT's head class) gives up
    ``per_class`` of them (5,000 -> 4,900 at 100 per class): its train count is recorded.
    """
    if rule not in SELECTIONS:
        raise LtcacheError(f"unknown selection rule '{rule}'; use one of: {', '.join(SELECTIONS)}")
    if per_class < 1:
        raise LtcacheError(f"--val-per-class must be >= 1 (got {per_class}): every val-based choice needs "
                           "val images of every class")
    labels = np.asarray(labels)
    order = _class_order(labels, rule, seed)
    for c, n in enumerate(counts):
        if n <= 0:
            raise LtcacheError(f"the long-tailed profile leaves class {c} with {n} images; "
                               "lower the imbalance ratio")
    train, val, kept = [], [], []
    for c, n in enumerate(counts):
        idx = order[c] if c < len(order) else np.zeros(0, dtype=np.int64)
        name = class_names[c] if class_names is not None else str(c)
        if len(idx) < per_class + 1:
            raise LtcacheError(f"class {name} has {len(idx)} training images: too few to hold out "
                               f"{per_class} for val and train on the rest; lower --val-per-class")
        avail = len(idx) - per_class
        take = min(int(n), avail)
        train.append(idx[:take])
        val.append(np.sort(idx[len(idx) - per_class:]))
        kept.append(take)
    return (np.concatenate(train).astype(np.int64), np.concatenate(val).astype(np.int64), kept)


def holdout_from_list(labels: Sequence[int], per_class: int, seed: int = 0,
                      class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """Val held out of a train list that already is long-tailed (a split list without a val list,
    e.g. iNaturalist-2018, whose official val list is the reported test set): ``per_class`` images
    of each class drawn (seeded), but never a class's last training image. Returns (train rows,
    val rows, the classes given fewer than ``per_class`` val images as (name, count))."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed + 1)
    train, val, short = [], [], []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        rows = np.where(labels == c)[0]
        take = max(0, min(per_class, len(rows) - 1))
        if take < per_class:
            short.append((class_names[c] if class_names is not None else str(c), take))
        picked = rng.choice(len(rows), take, replace=False) if take else np.zeros(0, dtype=np.int64)
        keep = np.ones(len(rows), dtype=bool)
        keep[picked] = False
        train.append(rows[keep])
        val.append(np.sort(rows[picked]))
    cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return cat(train), cat(val), short


def draw_validation(labels: Sequence[int], selected: np.ndarray, per_class: int,
                    seed: int = 0, class_names: Sequence[str] | None = None) -> tuple[np.ndarray, list]:
    """The LEGACY val split (``val_split="leftover"``, checkpoints made before the holdout rule):
    ``per_class`` images per class drawn (seeded) from the training images the profile did NOT
    select. A class the profile takes in full gets none; new datasets use
    :func:`holdout_then_select`.

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
