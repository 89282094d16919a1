"""LTDataset: a long-tailed train split, a balanced val split and the test split. Small images
(CIFAR-sized, up to SMALL_IMAGE px) are decoded once into memory as uint8 tensors; larger ones are
streamed: the split keeps file paths and ``LTDataset.loader`` decodes them batch by batch in
DataLoader workers (ltcache.data.streaming)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ltcache.data import augment as A
from ltcache.data.profiles import (default_val_per_class, draw_validation, holdout_from_list, holdout_then_select,
                                   lt_counts, select_indices)
from ltcache.data.sources import SMALL_IMAGE, SourceData, load_cifar, load_imagefolder, load_splitlist
from ltcache.data.spec import DatasetSpec, parse_source
from ltcache.data.streaming import Batch, PathTable, check_views, decode_center, stream_batches
from ltcache.errors import LtcacheError
from ltcache.groups import shot_groups
from ltcache.progress import echo


def default_data_root() -> Path:
    """``$LTCACHE_DATA`` or ``./data``."""
    return Path(os.environ.get("LTCACHE_DATA", "data"))


@dataclass
class Split:
    """One split: labels [N], index = row in the source split, and either the images in memory
    (uint8 [N,3,H,W]) or, for a streamed split, the file paths of the source split (``paths``,
    ``_images`` None) whose centre views are ``crop`` px."""

    _images: Optional[torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    paths: Optional[PathTable] = None
    crop: int = 224

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def streamed(self) -> bool:
        """True for a path-backed split (images read batch by batch by ``LTDataset.loader``)."""
        return self._images is None

    def row_paths(self, rows) -> list:
        """The file paths of the given rows of a streamed split."""
        return [self.paths[int(i)] for i in self.index[torch.as_tensor(rows, dtype=torch.long).reshape(-1)]]

    def images(self, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 images of the given rows (all rows when ``idx`` is None), on the CPU. A streamed
        split decodes those rows' centre views here, one by one: for small uses only."""
        if self.streamed:
            rows = torch.arange(len(self)) if idx is None else torch.as_tensor(idx, dtype=torch.long).reshape(-1)
            return decode_center(self.row_paths(rows), self.crop)
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

    @property
    def streamed(self) -> bool:
        """True when any split is path-backed (read batch by batch through ``loader``)."""
        return any(getattr(sp, "streamed", False) for sp in self.splits.values())

    def augment(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training augmentation of a uint8 batch: CIFAR crop(pad 4)+flip for small images,
        RandomResizedCrop+flip for large ones."""
        if self.small_images:
            return A.crop_flip(x, 4, generator)
        return A.resized_crop_flip(x, generator=generator)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> normalised float32."""
        return A.normalize(x, self.mean, self.std)

    def loader(self, split: str, rows: torch.Tensor, batch_size: int, views: Sequence[str],
               seeds: Optional[torch.Tensor] = None, workers: int = 8, skip_bad: bool = False,
               pin_memory: bool = False) -> Iterator[Batch]:
        """Batches of the given ``rows`` of ``split``, in order, ``batch_size`` rows each (the last
        one shorter): ``Batch.images`` uint8 [b, V, 3, S, S] with one entry per name in ``views``
        ("center"; "hflip" = the centre view flipped; "train" = the training augmentation, each
        "train" entry an independent draw), ``labels``, ``pos`` (positions within ``rows``) and
        ``skipped`` (unreadable files left out, with ``skip_bad``; without it such a file raises a
        one-line LtcacheError). ``seeds`` (one int64 per row) are required for "train" views.

        Streamed splits are decoded by ``workers`` DataLoader workers (0: in this process), the
        k-th train view of a row seeded by (its seed, k) alone. In-memory splits are batched from
        memory, their train views drawn by ``augment`` with one generator per batch seeded from
        the batch's row seeds."""
        sp = self.splits[split]
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu()
        if seeds is not None:
            seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1).cpu()
            if len(seeds) != len(rows):
                raise ValueError(f"{len(seeds)} seeds for {len(rows)} rows; give one seed per row")
        if getattr(sp, "streamed", False):
            return stream_batches(sp.paths, sp.index[rows], sp.labels[rows], batch_size, views, seeds, workers,
                                  skip_bad, pin_memory, crop=sp.crop)
        check_views(views, seeds)
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be positive")
        return self._memory_batches(sp, rows, batch_size, list(views), seeds, pin_memory)

    def _memory_batches(self, sp: Split, rows: torch.Tensor, batch_size: int, views: list,
                        seeds: Optional[torch.Tensor], pin_memory: bool) -> Iterator[Batch]:
        pin = pin_memory and torch.cuda.is_available()
        for lo in range(0, len(rows), batch_size):
            r = rows[lo:lo + batch_size]
            x = sp.images(r)
            out, k = [], 0
            for v in views:
                if v == "center":
                    out.append(x)
                elif v == "hflip":
                    out.append(A.hflip(x))
                else:
                    chunk = [int(s) % (1 << 64) for s in seeds[lo:lo + batch_size]]
                    seed = int(np.random.SeedSequence(chunk + [k]).generate_state(1, np.uint64)[0])
                    out.append(self.augment(x, torch.Generator().manual_seed(seed)))
                    k += 1
            images = torch.stack(out, 1)
            yield Batch(images.pin_memory() if pin else images, sp.labels[r].clone(),
                        torch.arange(lo, lo + len(r), dtype=torch.long), [])


def _load_source(spec: DatasetSpec, root: Path, download: bool, image_size: int, workers: int,
                 stream: Optional[bool], quiet: bool = False) -> SourceData:
    kind, arg = parse_source(spec.source)
    if kind in ("cifar10", "cifar100"):
        return load_cifar(kind, root, download)          # 32 px pickles: always in memory
    if kind == "imagefolder":
        return load_imagefolder(arg, root, image_size, workers, stream, quiet=quiet)
    return load_splitlist(arg, root, image_size, workers, stream)


def build_dataset(spec: DatasetSpec, data_root=None, download: bool = False, quiet: bool = False,
                  image_size: int = 224, workers: int = 8, stream: Optional[bool] = None) -> LTDataset:
    """Build the long-tailed dataset described by ``spec``; fills ``spec.class_names`` and
    ``spec.class_counts``. Raises LtcacheError for every user-fixable problem.

    ``stream``: image folders and split lists keep file paths only and are read batch by batch
    through ``LTDataset.loader`` (crops of ``image_size`` px); None streams exactly when their
    images are larger than SMALL_IMAGE px (one image's header is read). False decodes them into
    memory (larger images as centre crops of ``image_size``). ``workers``: decode workers."""
    root = Path(data_root) if data_root else default_data_root()
    src = _load_source(spec, root, download, image_size, workers, stream, quiet=quiet)
    k = len(src.class_names)
    train_labels = src.train.labels
    if train_labels.min() < 0 or train_labels.max() >= k:
        raise LtcacheError(f"training labels must be in [0, {k - 1}]; fix the split list")
    per_class = spec.val_per_class
    if per_class is None:
        per_class = default_val_per_class(k, int(np.bincount(train_labels, minlength=k).min()))
    sel, counts, held_out = _select_train(spec, src, k, per_class, quiet)
    val_src, val_idx = _select_val(spec, src, sel, held_out, per_class, quiet)
    test_idx = np.arange(len(src.test.labels), dtype=np.int64)
    splits = {"train": _split(src.train, sel, image_size), "val": _split(val_src, val_idx, image_size),
              "test": _split(src.test, test_idx, image_size)}
    size = int(image_size) if src.streamed else int(splits["train"].images().shape[-1])
    small = size <= SMALL_IMAGE
    spec.class_names = list(src.class_names)
    spec.class_counts = [int(c) for c in counts]
    spec.val_per_class = int(per_class)
    spec.val_counts = np.bincount(val_src.labels[val_idx], minlength=k).astype(int).tolist() if len(val_idx) else [0] * k
    return LTDataset(spec=spec, class_names=list(src.class_names), class_counts=spec.class_counts,
                     splits=splits, mean=A.CIFAR_MEAN if small else A.IMAGENET_MEAN,
                     std=A.CIFAR_STD if small else A.IMAGENET_STD, image_size=size)


def _select_train(spec: DatasetSpec, src: SourceData, k: int, per_class: int, quiet: bool) -> tuple:
    """(the train rows kept, the class counts, the val rows held out of the train list or None):
    a long-tailed train list as it is, a balanced one drawn down to the profile."""
    train_labels = src.train.labels
    holdout = src.val is None and spec.val_split == "holdout" and per_class > 0
    val_idx = None
    if src.train_is_lt:
        counts = np.bincount(train_labels, minlength=k).tolist()
        if min(counts) == 0:
            empty = counts.index(0)
            raise LtcacheError(f"class {empty} has no training image in the train list; fix the list")
        sel = np.arange(len(train_labels), dtype=np.int64)
        if holdout:
            # no val list (iNaturalist-2018: its val list is the reported test set): val held out of
            # the train list, never a class's last image
            sel, val_idx, short = holdout_from_list(train_labels, per_class, spec.seed, src.class_names)
            counts = np.bincount(train_labels[sel], minlength=k).tolist()
            if short:
                echo(f"val split: {len(short)} class(es) have too few training images for {per_class} val "
                     f"images each (e.g. {short[0][0]}: {short[0][1]}); val accuracy averages over the classes "
                     "present", quiet)
    else:
        n_max = int(np.bincount(train_labels, minlength=k).max())
        counts = lt_counts(n_max, k, spec.imb_ratio, spec.profile)
        if holdout:
            # val first, from the full training set; the profile draws from the rest
            sel, val_idx, counts = holdout_then_select(train_labels, counts, per_class, spec.selection,
                                                       spec.seed, src.class_names)
        else:
            sel = select_indices(train_labels, counts, spec.selection, spec.seed)
    return sel, counts, val_idx


def _select_val(spec: DatasetSpec, src: SourceData, sel: np.ndarray, held_out: Optional[np.ndarray],
                per_class: int, quiet: bool) -> tuple:
    """(the val split's source, its rows): the source's val list, the rows held out of the train
    list, or spare train images the profile left out."""
    if src.val is not None:
        return src.val, np.arange(len(src.val.labels), dtype=np.int64)
    if spec.val_split == "holdout" and per_class > 0:
        return src.train, held_out
    val_idx, short = draw_validation(src.train.labels, sel, per_class, spec.seed, src.class_names)
    if short:
        echo("val split: fewer than %d spare images for %s (the profile keeps them all for "
             "training); val accuracy averages over the classes present"
             % (per_class, ", ".join(f"{n} ({k})" for n, k in short)), quiet)
    return src.train, val_idx


def _split(raw, idx: np.ndarray, image_size: int) -> Split:
    """A split of rows ``idx`` of a source's list: decoded images, or paths read batch by batch."""
    labels, index = torch.from_numpy(raw.labels[idx].copy()), torch.from_numpy(idx.copy())
    if raw.streamed:
        return Split(None, labels, index, raw.paths, image_size)
    return Split(raw.load(idx), labels, index)
