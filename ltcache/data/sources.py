"""Readers for the supported image sources: CIFAR pickles (torchvision), image folders
(optionally a .tar.gz), and ImageNet-LT-style split lists. Each yields labels up front and
decodes images only for the rows actually used: small images (up to SMALL_IMAGE px) into memory,
larger ones not at all -- their splits keep the file paths and are streamed batch by batch
(ltcache.data.streaming)."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

try:                                   # POSIX; elsewhere concurrent first unpacks are not serialised
    import fcntl
except ImportError:                    # pragma: no cover
    fcntl = None

import numpy as np
import torch

from ltcache.data.decode import to_rgb
from ltcache.data.streaming import PathTable, image_size as file_image_size
from ltcache.errors import LtcacheError, os_error
from ltcache.progress import progress

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SMALL_IMAGE = 64      # images up to this size keep their native resolution


@dataclass
class RawSplit:
    """Labels of one source split, plus a loader that decodes chosen rows to uint8 [n,3,H,W]
    (in-memory splits) or the file paths of its rows (streamed splits, ``load`` None)."""

    labels: np.ndarray
    load: Optional[Callable[[np.ndarray], torch.Tensor]]
    paths: Optional[PathTable] = None

    @property
    def streamed(self) -> bool:
        return self.load is None


@dataclass
class SourceData:
    class_names: list
    train: RawSplit
    test: RawSplit
    val: Optional[RawSplit] = None        # given by the source (image folder val/, split list)
    train_is_lt: bool = False             # split lists: the given train list already is long-tailed

    @property
    def streamed(self) -> bool:
        return self.train.streamed


# ---------------------------------------------------------------------------------- CIFAR
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def load_cifar(name: str, root: Path, download: bool) -> SourceData:
    """CIFAR-10/100 in torchvision's on-disk pickle format (downloaded by torchvision if asked)."""
    folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[name]
    base = root / folder
    if not base.is_dir():
        if not download:
            raise LtcacheError(
                f"{name} not found under {root} (expected {base}); pass --data-root DIR if DIR/{folder} "
                "exists, --download to fetch it (needs a network), or give the images as an image folder: "
                "--dataset imagefolder:PATH (PATH/train/<class>/*, PATH/test/<class>/*, or a .tar.gz of it; "
                "data/README.md shows how to make data/cifar10-jpg.tar.gz)")
        import torchvision
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
        except Exception as exc:  # network errors come in many types
            raise LtcacheError(f"downloading {name} failed ({exc.__class__.__name__}: {exc}); "
                               "check the network or use imagefolder:PATH") from None

    def read(files):
        data, labels = [], []
        for f in files:
            p = base / f
            if not p.is_file():
                raise LtcacheError(f"{p} is missing; re-download {name} (--download) or fix the data root")
            try:
                d = _unpickle(p)
            except Exception as exc:
                raise LtcacheError(f"{p} is not a readable CIFAR pickle ({exc}); re-download it") from None
            data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(d[labels_key])
        return torch.from_numpy(np.concatenate(data)), np.asarray(labels, dtype=np.int64)

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    names = list(_unpickle(base / meta_file)[names_key])
    return SourceData(class_names=names,
                      train=RawSplit(train_y, lambda idx, x=train_x: x[torch.as_tensor(idx)]),
                      test=RawSplit(test_y, lambda idx, x=test_x: x[torch.as_tensor(idx)]))


# ---------------------------------------------------------------------------------- decoding
def _decode(path: str, image_size: int) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = to_rgb(im)                     # every mode, 16-bit gray included
            w, h = im.size
            if max(w, h) > SMALL_IMAGE:
                short = int(round(image_size / 0.875))
                scale = short / min(w, h)
                im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - image_size) // 2, (h - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise LtcacheError(f"cannot decode image {path} ({exc}); remove or replace the file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decoder(paths: list, image_size: int, desc: str, workers: int = 8,
            quiet: bool = True) -> Callable[[np.ndarray], torch.Tensor]:
    """A loader that decodes the requested rows in a thread pool into one uint8 tensor."""
    def load(idx: np.ndarray) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            imgs = list(progress(pool.map(lambda i: _decode(paths[i], image_size), idx),
                                 total=len(idx), desc=f"decode {desc}", quiet=quiet, unit="img"))
        shapes = {tuple(t.shape) for t in imgs}
        if len(shapes) > 1:
            raise LtcacheError(f"{desc}: images of different sizes {sorted(shapes)[:3]}; images up to "
                               f"{SMALL_IMAGE} px must all have one size")
        return torch.stack(imgs)
    return load


def large_images(paths: list, tries: int = 8) -> bool:
    """Whether the images of a split are larger than SMALL_IMAGE px, from the header of its first
    readable file (of the first ``tries``)."""
    err = None
    for p in paths[:tries]:
        try:
            return max(file_image_size(p)) > SMALL_IMAGE
        except LtcacheError as exc:
            err = err or exc
    raise err if err else LtcacheError("no image to look at; the split is empty")


def raw_split(paths: list, labels: np.ndarray, stream: bool, image_size: int, desc: str,
              workers: int) -> RawSplit:
    """A streamed split (paths only) or an in-memory one (decoded on first use)."""
    if stream:
        return RawSplit(labels, None, PathTable(paths))
    return RawSplit(labels, decoder(paths, image_size, desc, workers))


# ---------------------------------------------------------------------------------- folders
def unpack_tarball(tar_path: Path, data_root: Path, quiet: bool = False) -> Path:
    """Unpack a .tar.gz image folder once into the data root (atomic); return its folder."""
    name = tar_path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    dest = data_root / name
    if (dest / ".unpacked").exists():
        return dest
    # several processes started at once (e.g. pipelines in parallel) unpack once: the others wait
    # on the lock, then find the folder complete (without it, a late finisher replaced the folder
    # while an early one was reading images from it)
    try:
        data_root.mkdir(parents=True, exist_ok=True)
        lock = open(data_root / f".{name}.unpack.lock", "w")
    except OSError as exc:
        raise LtcacheError(f"{tar_path} is unpacked into the data root, but {os_error(exc, data_root / name)}; "
                           "pass --data-root DIR with a folder you can write to") from None
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".unpacked").exists():
            _unpack(tar_path, data_root, name, dest, quiet)
    return dest


def _unpack(tar_path: Path, data_root: Path, name: str, dest: Path, quiet: bool = False) -> None:
    """Extract into a temporary folder beside ``dest``, mark it complete, then move it in place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=data_root))
    try:
        try:
            tf = tarfile.open(tar_path)
        except tarfile.TarError:
            raise LtcacheError(f"cannot unpack {tar_path} (not a gzip/tar file); check the file") from None
        with tf:                            # said once the file is known to be an archive
            if not quiet:
                print(f"unpacking {tar_path} into {dest} (once; later runs read the folder)", file=sys.stderr)
            tf.extractall(tmp, filter="data")
    except LtcacheError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise os_error(exc, dest) from None                    # the data root is full or read-only
        if isinstance(exc, tarfile.FilterError):
            why = f"unsafe entry: {exc}"
        elif isinstance(exc, OSError) and exc.strerror:
            why = exc.strerror
        else:
            why = "truncated or damaged"
        raise LtcacheError(f"cannot unpack {tar_path} ({why}); check the file") from None
    inner = [p for p in tmp.iterdir() if not p.name.startswith(".")]
    top = inner[0] if len(inner) == 1 and inner[0].is_dir() and not (tmp / "train").is_dir() else tmp
    (top / ".unpacked").write_text(str(tar_path))
    if dest.exists():
        shutil.rmtree(dest)                 # an incomplete earlier attempt
    os.replace(top, dest)
    shutil.rmtree(tmp, ignore_errors=True)


def _scan(split_dir: Path, class_names: list) -> tuple[list, np.ndarray]:
    paths, labels = [], []
    for c, name in enumerate(class_names):
        d = split_dir / name
        if not d.is_dir():
            continue
        files = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTS))
        paths += [str(d / f) for f in files]
        labels += [c] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def load_imagefolder(arg: str, data_root: Path, image_size: int, workers: int,
                     stream: Optional[bool] = None, quiet: bool = False) -> SourceData:
    """PATH/train/<class>/*, PATH/test/<class>/*, optional PATH/val/<class>/* (or a .tar.gz).
    ``stream``: keep paths only (None: when the images are larger than SMALL_IMAGE px)."""
    path = Path(arg).expanduser()
    if not path.exists() and not path.is_absolute() and (data_root / arg).exists():
        path = data_root / arg
    if not path.exists():
        if not path.is_absolute():          # e.g. a checkpoint's relative source, used from another folder
            raise LtcacheError(f"image folder {arg} not found in {Path.cwd()} nor under the data root "
                               f"{data_root.absolute()}; "
                               f"pass --data-root DIR where DIR/{arg} exists, or give its full path")
        raise LtcacheError(f"image folder {arg} not found; give PATH with train/<class>/ and "
                           "test/<class>/ folders, or a .tar.gz of that layout")
    if path.is_file():
        path = unpack_tarball(path, data_root, quiet)
    train_dir, test_dir, val_dir = path / "train", path / "test", path / "val"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise LtcacheError(f"{path} needs train/<class>/ and test/<class>/ folders (found: "
                           f"{', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'})")
    if (path / "classes.txt").is_file():
        names = [ln.strip() for ln in (path / "classes.txt").read_text().splitlines() if ln.strip()]
    else:
        names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not names:
        raise LtcacheError(f"{train_dir} has no class folders")
    found = {}
    for split, d in (("train", train_dir), ("test", test_dir), ("val", val_dir)):
        if not d.is_dir():
            continue
        paths, labels = _scan(d, names)
        if len(paths) == 0:
            raise LtcacheError(f"{d} holds no images ({', '.join(IMAGE_EXTS)})")
        found[split] = (paths, labels)
    if stream is None:
        stream = large_images(found["train"][0])
    splits = {s: raw_split(p, y, stream, image_size, f"{path.name}/{s}", workers) for s, (p, y) in found.items()}
    return SourceData(class_names=names, train=splits["train"], test=splits["test"], val=splits.get("val"))


def _read_list(path: Path, image_root: Path) -> tuple[list, np.ndarray]:
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise LtcacheError(f"{path}:{n}: expected '<relative path> <label>', got '{line.strip()}'")
        try:
            labels.append(int(parts[1]))
        except ValueError:
            raise LtcacheError(f"{path}:{n}: label '{parts[1]}' is not an integer") from None
        paths.append(str(image_root / parts[0]))
    return paths, np.asarray(labels, dtype=np.int64)


def load_splitlist(arg: str, data_root: Path, image_size: int, workers: int,
                   stream: Optional[bool] = None) -> SourceData:
    """ImageNet-LT / Places-LT / iNaturalist-2018 lists: DIR/NAME_{train,val,test}.txt.
    ``stream``: keep paths only (None: when the images are larger than SMALL_IMAGE px)."""
    prefix = Path(arg).expanduser()
    files = {s: Path(f"{prefix}_{s}.txt") for s in ("train", "val", "test")}
    missing = [str(p) for s, p in files.items() if s != "val" and not p.is_file()]
    if missing:
        raise LtcacheError(f"split list(s) not found: {', '.join(missing)}; give splitlist:DIR/NAME "
                           "with NAME_train.txt, NAME_val.txt and NAME_test.txt in DIR")
    found = {s: _read_list(p, data_root) for s, p in files.items() if p.is_file()}
    if stream is None:
        stream = large_images(found["train"][0] or found["test"][0])
    splits = {s: raw_split(p, y, stream, image_size, f"{prefix.name}/{s}", workers) for s, (p, y) in found.items()}
    k = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    return SourceData(class_names=[str(i) for i in range(k)], train=splits["train"],
                      test=splits["test"], val=splits.get("val"), train_is_lt=True)
