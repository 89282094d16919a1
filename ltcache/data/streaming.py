"""Streamed (path-backed) image splits: ImageNet-scale data is never held whole in memory.

A streamed split keeps only file paths (one compact byte buffer) and labels. Images are read
batch by batch by torch DataLoader workers, which decode each file once and make the asked
views from the full-size image with torchvision's transforms (the papers' ImageNet protocol):

- ``center``: Resize(round(S / 0.875)) + CenterCrop(S)  (S = 224: Resize(256) + CenterCrop(224))
- ``hflip``:  the centre view flipped
- ``train``:  RandomResizedCrop(S) + RandomHorizontalFlip + ColorJitter(0.4, 0.4, 0.4)

Views are uint8 [3, S, S]; normalisation stays on the device (``LTDataset.normalize``). The k-th
``train`` view of a row is drawn from a generator seeded by (the row's seed, k) alone, so it does
not depend on the number of workers, the batch split or the world size.

An image that cannot be read reaches the main process as a one-line LtcacheError naming the file
(not a worker traceback); with ``skip_bad`` it is left out of its batch and reported instead.
"""
from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ltcache.data.decode import to_rgb
from ltcache.errors import LtcacheError

VIEWS = ("center", "hflip", "train")
CROP_FRACTION = 0.875            # eval: short side resized to crop / 0.875 (224 -> 256), then centre crop
JITTER = 0.4                     # ColorJitter brightness = contrast = saturation (hue 0)
SKIP_HINT = "pass --skip-bad-images to skip such files"


class Batch(NamedTuple):
    """One batch of a loader: ``images`` uint8 [b, V, 3, S, S], ``labels`` int64 [b], ``pos`` int64 [b]
    (positions within the loader's ``rows``), ``skipped`` (paths of files left out of this batch)."""

    images: torch.Tensor
    labels: torch.Tensor
    pos: torch.Tensor
    skipped: List[str]


# ---------------------------------------------------------------------------------- paths
class PathTable:
    """File paths as one UTF-8 byte buffer plus offsets: a few bytes a path, cheap to pickle to
    workers, and no per-string Python objects whose reference counts copy forked pages."""

    def __init__(self, paths: Sequence[str] = ()):
        enc = [str(p).encode("utf-8", "surrogateescape") for p in paths]
        self.offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        if enc:
            np.cumsum([len(b) for b in enc], out=self.offsets[1:])
        self.buf = np.frombuffer(b"".join(enc), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.buf[lo:hi].tobytes().decode("utf-8", "surrogateescape")

    def subset(self, rows) -> "PathTable":
        """The paths of ``rows`` (in that order) as a new table (byte slices, no decoding)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside [0, {len(self)})")
        lo, hi = self.offsets[rows], self.offsets[rows + 1]
        out = PathTable()
        out.offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(hi - lo, out=out.offsets[1:])
        buf = self.buf
        out.buf = np.concatenate([buf[a:b] for a, b in zip(lo.tolist(), hi.tolist())]) if len(rows) else buf[:0].copy()
        return out


# ---------------------------------------------------------------------------------- transforms
def resize_size(crop: int) -> int:
    """Short side of the eval resize for a ``crop`` px centre crop (224 -> 256)."""
    return int(round(crop / CROP_FRACTION))


def eval_transform(crop: int = 224):
    """PIL image -> uint8 [3, crop, crop]: Resize(crop / 0.875) + CenterCrop(crop)."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(resize_size(crop)), T.CenterCrop(crop), T.PILToTensor()])


def train_transform(crop: int = 224, jitter: float = JITTER):
    """PIL image (full size) -> uint8 [3, crop, crop]: RandomResizedCrop + HFlip + ColorJitter."""
    from torchvision import transforms as T
    ops = [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
    if jitter:
        ops.append(T.ColorJitter(jitter, jitter, jitter))
    return T.Compose(ops + [T.PILToTensor()])


def view_seed(seed: int, k: int) -> int:
    """The generator seed of the k-th train view of a row whose seed is ``seed`` (well mixed, so
    neighbouring row seeds give unrelated draws)."""
    return int(np.random.SeedSequence([int(seed) % (1 << 64), int(k)]).generate_state(1, np.uint64)[0])


class BadImage(Exception):
    """A file that cannot be read as an image (raised and caught inside the workers)."""


def open_rgb(path: str):
    """The full-size RGB PIL image of ``path``; BadImage when it cannot be read."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return to_rgb(im)               # loads the pixels (truncated files fail here); any mode
    except Exception as exc:                # PIL's decoders raise many types (OSError, SyntaxError, zlib...)
        raise BadImage(str(exc) or exc.__class__.__name__) from None


def bad_image_error(path: str, why: str) -> LtcacheError:
    return LtcacheError(f"cannot decode image {path} ({why}); remove or replace the file, or {SKIP_HINT}")


def image_size(path: str) -> tuple:
    """(width, height) of an image file, read from its header."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise bad_image_error(path, str(exc) or exc.__class__.__name__) from None


def decode_center(paths: Sequence[str], crop: int = 224) -> torch.Tensor:
    """uint8 [n, 3, crop, crop] centre views of ``paths`` in this process (small uses: tests, peeks)."""
    tf = eval_transform(crop)
    out = []
    for p in paths:
        try:
            out.append(tf(open_rgb(p)))
        except BadImage as exc:
            raise bad_image_error(p, str(exc)) from None
    return torch.stack(out) if out else torch.zeros(0, 3, crop, crop, dtype=torch.uint8)


# ---------------------------------------------------------------------------------- dataset
class ViewDataset(torch.utils.data.Dataset):
    """Item i: the asked views of file ``paths[index[i]]``, made from one decode of the full-size
    image. Returns (i, views uint8 [V,3,S,S] or None, label, path, reason-if-bad)."""

    def __init__(self, paths: PathTable, index, labels: torch.Tensor, views: Sequence[str],
                 seeds: Optional[torch.Tensor], crop: int = 224, jitter: float = JITTER):
        self.paths, self.views, self.crop, self.jitter = paths, list(views), crop, jitter
        self.index = np.asarray(torch.as_tensor(index, dtype=torch.long).cpu()).reshape(-1)
        self.labels = np.asarray(torch.as_tensor(labels, dtype=torch.long).cpu()).reshape(-1)
        self.seeds = None if seeds is None else np.asarray(torch.as_tensor(seeds, dtype=torch.long).cpu())
        self._eval = self._train = None            # built lazily (in the worker)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        if self._eval is None:
            self._eval, self._train = eval_transform(self.crop), train_transform(self.crop, self.jitter)
        path = self.paths[int(self.index[i])]
        try:
            im = open_rgb(path)
        except BadImage as exc:
            return i, None, int(self.labels[i]), path, str(exc)
        out, center, k = [], None, 0
        for v in self.views:
            if v in ("center", "hflip"):
                if center is None:
                    center = self._eval(im)
                out.append(center if v == "center" else center.flip(-1))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(view_seed(int(self.seeds[i]), k))
                    out.append(self._train(im))
                k += 1
        return i, torch.stack(out), int(self.labels[i]), path, None


def collate(items) -> tuple:
    """Items -> (Batch without the unreadable items, [(path, reason)] of those)."""
    good = [it for it in items if it[1] is not None]
    bad = [(it[3], it[4]) for it in items if it[1] is None]
    images = torch.stack([it[1] for it in good]) if good else torch.zeros(0, dtype=torch.uint8)
    batch = Batch(images, torch.tensor([it[2] for it in good], dtype=torch.long),
                  torch.tensor([it[0] for it in good], dtype=torch.long), [p for p, _ in bad])
    return batch, bad


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)          # the workers decode in parallel; no intra-op threads on top


def check_views(views: Sequence[str], seeds) -> None:
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise ValueError(f"views {list(views)}: each must be one of {', '.join(VIEWS)} (at least one)")
    if "train" in views and seeds is None:
        raise ValueError("a 'train' view needs seeds (one int64 per row)")


def stream_batches(paths: PathTable, index, labels: torch.Tensor, batch_size: int, views: Sequence[str],
                   seeds: Optional[torch.Tensor] = None, workers: int = 8, skip_bad: bool = False,
                   pin_memory: bool = False, crop: int = 224, jitter: float = JITTER) -> Iterator[Batch]:
    """Batches of ``batch_size`` consecutive items (files ``paths[index[i]]`` with ``labels[i]``),
    in order, decoded by ``workers`` DataLoader workers (0: in this process). Every chunk yields
    one batch, even one whose images were all skipped (so ranks stepping together stay in step)."""
    check_views(views, seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be positive")
    if len(index) != len(labels) or (seeds is not None and len(seeds) != len(index)):
        raise ValueError(f"{len(index)} rows, {len(labels)} labels, {'no' if seeds is None else len(seeds)} seeds; "
                         "give one label and seed per row")
    ds = ViewDataset(paths, index, labels, views, seeds, crop, jitter)
    if len(ds) == 0:
        return
    workers = max(0, min(int(workers), -(-len(ds) // batch_size)))
    dl = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=workers, collate_fn=collate,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(), persistent_workers=False,
        worker_init_fn=_worker_init if workers else None)
    it = iter(dl)
    try:
        for batch, bad in it:
            if bad and not skip_bad:
                raise bad_image_error(*bad[0])
            if batch.images.shape[0] == 0:
                batch = batch._replace(images=torch.zeros(0, len(views), 3, crop, crop, dtype=torch.uint8))
            yield batch
    finally:
        del it                        # shuts the workers down now, also when the caller stops early
