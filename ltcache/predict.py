"""Classifying image files with an exported model (``ltcache predict``).

:func:`predict_images` finds the images (files, or folders searched recursively for image
extensions), decodes them in batches, runs them through the model's stored preprocessing and
test-time views (:mod:`ltcache.export`) and returns one :class:`Prediction` per image;
:func:`write_predictions` writes them as CSV (atomically, through :mod:`ltcache.outputs`).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ltcache.errors import LtcacheError

CSV_COLUMNS = ("path", "class_index", "class_name", "probability")


@dataclass
class Prediction:
    """One image's prediction: top-1 class and its softmax probability (views averaged)."""

    path: str
    class_index: int
    class_name: str
    probability: float


def find_images(inputs: Sequence[Union[str, Path]]) -> list[Path]:
    """Image files named by ``inputs``: a file as given, a folder searched recursively for
    image extensions (sorted; hidden files skipped); each file once, in the order found."""
    from ltcache.data.sources import IMAGE_EXTS

    if not inputs:
        raise LtcacheError("no images given; pass image files or folders of them")
    out, seen = [], set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)), key=str)
            if not found:
                raise LtcacheError(f"folder {p} holds no images ({', '.join(IMAGE_EXTS)}); give image files "
                                   "or a folder that has some")
        elif p.is_file():
            found = [p]
        else:
            raise LtcacheError(f"image path {p} does not exist; give image files or folders of them")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def open_image(path: Path):
    """The image at ``path`` as an RGB PIL image (a one-line LtcacheError when it cannot be decoded)."""
    from PIL import Image

    from ltcache.data.decode import to_rgb
    try:
        with Image.open(path) as im:
            return to_rgb(im)               # every mode, 16-bit gray included
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LtcacheError(f"cannot decode image {path} ({exc}); remove or replace the file, or leave it "
                           "out of the arguments") from None


def predict_images(model, inputs: Sequence[Union[str, Path]], batch_size: int = 64,
                   flip: Optional[bool] = None, device: str = "auto", quiet: bool = True) -> list[Prediction]:
    """Top-1 predictions for the image files in ``inputs``.

    ``model``: an exported model file or a module from :func:`ltcache.export.load_model`.
    ``flip``: average the horizontally flipped view's logits too (default: as stored in the
    model file, which matches the number ``retrain`` reported)."""
    from ltcache.devices import resolve_device
    from ltcache.export import load_model
    from ltcache.progress import progress

    if batch_size < 1:
        raise LtcacheError(f"batch size must be >= 1 (got {batch_size})")
    dev = resolve_device(device)
    if not isinstance(model, torch.nn.Module):
        model = load_model(model)
    paths = find_images(inputs)
    model = model.to(dev).eval()
    use_flip = model.flip if flip is None else bool(flip)
    names = list(getattr(model, "class_names", None) or [])
    out: list[Prediction] = []
    with torch.no_grad(), progress(total=len(paths), desc="predict", quiet=quiet, unit="img") as bar:
        for lo in range(0, len(paths), batch_size):
            chunk = paths[lo:lo + batch_size]
            x = model.preprocess([open_image(p) for p in chunk]).to(dev)
            z = model.forward_normalized(model.normalize(x), flip=use_flip).float()
            prob, idx = z.softmax(1).max(1)
            for p, k, pr in zip(chunk, idx.tolist(), prob.tolist()):
                out.append(Prediction(str(p), int(k), names[k] if k < len(names) else str(k), float(pr)))
            bar.update(len(chunk))
    return out


def predictions_csv(rows: Sequence[Prediction]) -> str:
    """The predictions as CSV text: a header, then one row per image."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([r.path, r.class_index, r.class_name, f"{r.probability:.6f}"])
    return buf.getvalue()


def write_predictions(rows: Sequence[Prediction], path: Union[str, Path]) -> Path:
    """Write the predictions CSV to ``path`` (temporary name, then renamed)."""
    from ltcache.outputs import write_text

    return write_text(Path(path), predictions_csv(rows))
