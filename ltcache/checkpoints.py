"""Reading PyTorch checkpoint files: a one-line error for a missing, truncated or foreign file.

Below both :mod:`ltcache.stage1` (which writes ``stage1.pt``) and :mod:`ltcache.cache` (which
reads it to extract features), so neither imports the other for it."""
from __future__ import annotations

from pathlib import Path

import torch

from ltcache.errors import LtcacheError

FORMAT = "ltcache-stage1"
FORMAT_VERSION = 1


def read_torch_file(path, missing_fix: str, damaged_fix: str):
    """``torch.load`` of a checkpoint file; a missing or unreadable file is a one-line error
    ending with the given fix."""
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"checkpoint {path} not found; {missing_fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LtcacheError(f"{path} is not a readable PyTorch checkpoint ({exc.__class__.__name__}); "
                           f"it may be truncated: {damaged_fix}") from None


def read_pretrained(path) -> dict:
    """The state dict in a local weights file: a plain state dict (torchvision's layout or
    ltcache's), one under ``state_dict`` / ``model``, or an ltcache stage-1 checkpoint's."""
    path = Path(path)
    obj = read_torch_file(path, "give a local weights file", "save the weights again")
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise LtcacheError(f"{path} holds no state dict (a dict of tensors); save model.state_dict() with torch.save")
    return obj


def load_checkpoint(path) -> dict:
    """Read a ``stage1.pt``; an unreadable, truncated or foreign file is a one-line error."""
    path = Path(path)
    ck = read_torch_file(path, "train one with `ltcache train`", "re-train or point to another file")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise LtcacheError(f"{path} is not an ltcache stage-1 checkpoint; for a plain state dict "
                           "use `ltcache extract --arch NAME --dataset ...`")
    if ck.get("format_version", 0) > FORMAT_VERSION:
        raise LtcacheError(f"{path} was written by a newer ltcache (format {ck['format_version']}); upgrade ltcache")
    return ck
