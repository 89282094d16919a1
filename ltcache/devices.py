"""Device selection shared by every command."""
from __future__ import annotations

import torch

from ltcache.errors import LtcacheError


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N`` to a torch device; ``auto`` picks CUDA when present."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LtcacheError(f"--device {name} was asked for but no CUDA GPU is visible; "
                               "use --device cpu or --device auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise LtcacheError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
