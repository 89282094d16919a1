"""Tiny datasets in the real on-disk formats, generated for tests (and for pipelines/smoke.toml).

Pixels are a class-dependent colour plus noise, so a small model can learn them.
Run as a script to make the smoke pipeline's image folder: python tests/datagen.py data/smoke-data
"""
from __future__ import annotations

import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _pixels(rng, label: int, num_classes: int, n: int, size: int) -> np.ndarray:
    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 181 + 160) % 256], dtype=np.float32)
    img = hue[None, :, None, None] + rng.normal(0, 30, size=(n, 3, size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_cifar_pickles(root, name: str = "cifar10", per_class_train: int = 20, per_class_test: int = 5,
                       num_classes=None) -> Path:
    """torchvision's CIFAR pickle layout (cifar-10-batches-py/ or cifar-100-python/)."""
    root = Path(root)
    k = num_classes or (10 if name == "cifar10" else 100)
    rng = np.random.default_rng(0)

    def split(per_class):
        labels = np.repeat(np.arange(k), per_class)
        rng.shuffle(labels)
        data = np.concatenate([_pixels(rng, int(y), k, 1, 32) for y in labels]).reshape(len(labels), -1)
        return data, labels.tolist()

    tr, te = split(per_class_train), split(per_class_test)
    names = [f"class{i}" for i in range(k)]
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        chunks = np.array_split(np.arange(len(tr[1])), 5)
        for i, idx in enumerate(chunks, 1):
            with open(base / f"data_batch_{i}", "wb") as fh:
                pickle.dump({"data": tr[0][idx], "labels": [tr[1][j] for j in idx]}, fh)
        with open(base / "test_batch", "wb") as fh:
            pickle.dump({"data": te[0], "labels": te[1]}, fh)
        with open(base / "batches.meta", "wb") as fh:
            pickle.dump({"label_names": names}, fh)
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True, exist_ok=True)
        for fname, (d, y) in (("train", tr), ("test", te)):
            with open(base / fname, "wb") as fh:
                pickle.dump({"data": d, "fine_labels": y}, fh)
        with open(base / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": names}, fh)
    return base


def _write_images(folder: Path, label: int, k: int, n: int, size: int, rng, start: int = 0) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(_pixels(rng, label, k, n, size)):
        p = folder / f"{start + i:04d}.png"
        Image.fromarray(arr.transpose(1, 2, 0)).save(p)
        paths.append(p)
    return paths


def make_imagefolder(root, num_classes: int = 4, per_class_train: int = 30, per_class_test: int = 10,
                     size: int = 32, with_val: bool = False) -> Path:
    """root/train/<class>/NNNN.png, root/test/<class>/..., optionally root/val/<class>/..."""
    root = Path(root)
    rng = np.random.default_rng(1)
    splits = [("train", per_class_train), ("test", per_class_test)] + ([("val", 3)] if with_val else [])
    for split, n in splits:
        for c in range(num_classes):
            _write_images(root / split / f"class{c}", c, num_classes, n, size, rng)
    return root


def make_tarball(folder, tar_path) -> Path:
    """A .tar.gz of ``folder`` with the folder as its single top-level directory."""
    folder, tar_path = Path(folder), Path(tar_path)
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return tar_path


def make_splitlists(root, name: str, num_classes: int, counts, size: int = 32) -> Path:
    """Images under root/images/ and ImageNet-LT-style lists root/<name>_{train,val,test}.txt."""
    root = Path(root)
    rng = np.random.default_rng(2)
    for split, per in (("train", None), ("val", 2), ("test", 3)):
        lines = []
        for c in range(num_classes):
            n = counts[c] if per is None else per
            for p in _write_images(root / "images" / split / f"c{c}", c, num_classes, n, size, rng):
                lines.append(f"{p.relative_to(root)} {c}")
        (root / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root / name


def make_large_imagefolder(root, num_classes: int = 3, per_class_train: int = 8, per_class_test: int = 3,
                           width: int = 96, height: int = 80, ext: str = "jpg") -> Path:
    """An image folder of images larger than 64 px (streamed): root/{train,test}/<class>/NNNN.<ext>,
    ``width`` x ``height`` px, a class colour plus noise and a gradient (so crops and flips show)."""
    root = Path(root)
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 120, width, dtype=np.float32)[None, None, :]
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for c in range(num_classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            hue = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 181 + 160) % 256], dtype=np.float32)
            for i in range(n):
                arr = hue[:, None, None] * 0.5 + ramp + rng.normal(0, 25, size=(3, height, width))
                img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8).transpose(1, 2, 0))
                img.save(folder / f"{i:04d}.{ext}")
    return root


def corrupt_image(path) -> Path:
    """Overwrite ``path`` with bytes no image reader accepts (keeps the file name)."""
    path = Path(path)
    path.write_bytes(b"not an image" * 10)
    return path


if __name__ == "__main__":
    out = make_imagefolder(sys.argv[1] if len(sys.argv) > 1 else "data/smoke-data", num_classes=4,
                           per_class_train=24, per_class_test=8)
    print(f"wrote {out}")
