"""The arithmetic of a stage-2 sweep's GEMMs (``--precision``): fp32, bf16 or tf32.

``fp32`` (the default) is the engine's exact arithmetic; the exactness tests hold there.
``bf16`` keeps the train features in bfloat16 and runs the two GEMMs of a step in it (the
weights or the loss gradient cast per step, products back in float32); parameters, the loss,
its gradient, the update and all evaluation stay float32 -- the mixed precision of autocast.
It halves the feature table's memory and is ~2x faster per GEMM on CPUs with AVX-512 BF16 and
on GPUs (``benchmarks/RESULTS.md`` gives the speed and the accuracy change). ``tf32`` lets CUDA
tensor cores run the float32 GEMMs in TF32 (10-bit mantissa inputs, float32 accumulation);
CPUs have no such mode, so it is refused there.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ltcache.errors import LtcacheError
from ltcache.options import PRECISIONS



def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if it is known and the device supports it, else a one-line LtcacheError."""
    if precision not in PRECISIONS:
        raise LtcacheError(f"unknown --precision '{precision}'; use {', '.join(PRECISIONS)}")
    if precision == "tf32" and torch.device(device).type != "cuda":
        raise LtcacheError("--precision tf32 is a mode of CUDA tensor cores; on a CPU use fp32 (exact) or bf16")
    return precision


def feature_dtype(precision: str) -> torch.dtype:
    """The dtype the train features are held in for the GEMMs of a step."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


@contextmanager
def matmul_mode(precision: str) -> Iterator[None]:
    """TF32 for CUDA float32 GEMMs inside the block when ``precision`` is tf32 (restored after)."""
    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
