"""LTDataset: a long-tailed train split, a balanced val split and the test split, decoded once
into memory as uint8 tensors."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ltcache.data import augment as A
from ltcache.data.profiles import (default_val_per_class, draw_validation, holdout_then_select, lt_counts,
                                   select_indices)
from ltcache.data.sources import SMALL_IMAGE, SourceData, load_cifar, load_imagefolder, load_splitlist
from ltcache.data.spec import DatasetSpec, parse_source
from ltcache.errors import LtcacheError
from ltcache.groups import shot_groups
from ltcache.progress import echo


def default_data_root() -> Path:
    """``$LTCACHE_DATA`` or ``./data``."""
    return Path(os.environ.get("LTCACHE_DATA", "data"))


@dataclass
class Split:
    """One split in memory: images uint8 [N,3,H,W], labels [N], index = row in the source split."""

    _images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def images(self, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 images of the given rows (all rows when ``idx`` is None), on the CPU."""
        return self._images if idx is None else self._images[torch.as_tensor(idx, dtype=torch.long)]


@dataclass
class LTDataset:
    """A long-tailed dataset: spec (with class names and counts), splits and transforms."""

    spec: DatasetSpec
    class_names: list
    class_counts: list
    splits: dict
    mean: tuple
    std: tuple
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def groups(self) -> list:
        return shot_groups(self.class_counts)

    @property
    def small_images(self) -> bool:
        return self.image_size <= SMALL_IMAGE

    def augment(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training augmentation of a uint8 batch: CIFAR crop(pad 4)+flip for small images,
        RandomResizedCrop+flip for large ones."""
        if self.small_images:
            return A.crop_flip(x, 4, generator)
        return A.resized_crop_flip(x, generator=generator)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> normalised float32."""
        return A.normalize(x, self.mean, self.std)


def _load_source(spec: DatasetSpec, root: Path, download: bool, image_size: int, workers: int) -> SourceData:
    kind, arg = parse_source(spec.source)
    if kind in ("cifar10", "cifar100"):
        return load_cifar(kind, root, download)
    if kind == "imagefolder":
        return load_imagefolder(arg, root, image_size, workers)
    return load_splitlist(arg, root, image_size, workers)


def build_dataset(spec: DatasetSpec, data_root=None, download: bool = False, quiet: bool = False,
                  image_size: int = 224, workers: int = 8) -> LTDataset:
    """Build the long-tailed dataset described by ``spec``; fills ``spec.class_names`` and
    ``spec.class_counts``. Raises LtcacheError for every user-fixable problem."""
    root = Path(data_root) if data_root else default_data_root()
    src = _load_source(spec, root, download, image_size, workers)
    k = len(src.class_names)
    train_labels = src.train.labels
    if train_labels.min() < 0 or train_labels.max() >= k:
        raise LtcacheError(f"training labels must be in [0, {k - 1}]; fix the split list")
    per_class = spec.val_per_class
    if per_class is None:
        per_class = default_val_per_class(k, int(np.bincount(train_labels, minlength=k).min()))
    if src.train_is_lt:
        counts = np.bincount(train_labels, minlength=k).tolist()
        if min(counts) == 0:
            empty = counts.index(0)
            raise LtcacheError(f"class {empty} has no training image in the train list; fix the list")
        sel = np.arange(len(train_labels), dtype=np.int64)
    else:
        n_max = int(np.bincount(train_labels, minlength=k).max())
        counts = lt_counts(n_max, k, spec.imb_ratio, spec.profile)
        if src.val is None and spec.val_split == "holdout" and per_class > 0:
            # val first, from the full training set; the profile draws from the rest
            sel, val_idx, counts = holdout_then_select(train_labels, counts, per_class, spec.selection,
                                                       spec.seed, src.class_names)
        else:
            sel = select_indices(train_labels, counts, spec.selection, spec.seed)
    if src.val is not None:
        val_src, val_idx = src.val, np.arange(len(src.val.labels), dtype=np.int64)
    elif spec.val_split == "holdout" and not src.train_is_lt and per_class > 0:
        val_src = src.train
    else:
        val_src = src.train
        val_idx, short = draw_validation(train_labels, sel, per_class, spec.seed, src.class_names)
        if short:
            echo("val split: fewer than %d spare images for %s (the profile keeps them all for "
                 "training); val accuracy averages over the classes present"
                 % (per_class, ", ".join(f"{n} ({k})" for n, k in short)), quiet)
    test_idx = np.arange(len(src.test.labels), dtype=np.int64)

    def make(raw, idx):
        return Split(raw.load(idx), torch.from_numpy(raw.labels[idx].copy()), torch.from_numpy(idx.copy()))

    splits = {"train": make(src.train, sel), "val": make(val_src, val_idx), "test": make(src.test, test_idx)}
    size = int(splits["train"].images().shape[-1])
    small = size <= SMALL_IMAGE
    spec.class_names = list(src.class_names)
    spec.class_counts = [int(c) for c in counts]
    spec.val_per_class = int(per_class)
    spec.val_counts = np.bincount(val_src.labels[val_idx], minlength=k).astype(int).tolist() if len(val_idx) else [0] * k
    return LTDataset(spec=spec, class_names=list(src.class_names), class_counts=spec.class_counts,
                     splits=splits, mean=A.CIFAR_MEAN if small else A.IMAGENET_MEAN,
                     std=A.CIFAR_STD if small else A.IMAGENET_STD, image_size=size)
