"""One way to state a dataset's imbalance ratio everywhere (tables, info, report, headers).

The configured ratio is the ``--imb-ratio`` the long-tailed profile was drawn with; the realised one
is what the training split holds, max/min of its class counts (rounding to whole images and a head
class that gives up its val images make them differ, e.g. 100 configured, 98 realised).
"""
from __future__ import annotations

from typing import Optional, Sequence


def ir_text(configured: Optional[float], counts: Sequence[int] = ()) -> str:
    """``IR 100 configured, 98 realised`` (either part left out when unknown)."""
    counts = [int(c) for c in counts or ()]
    parts = [f"IR {float(configured):g} configured"] if configured is not None else []
    if counts and min(counts) > 0:
        realised = f"{max(counts) / min(counts):.3g} realised"
        parts.append(realised if parts else f"IR {realised}")
    return ", ".join(parts) + (" (max/min train count)" if counts and min(counts) > 0 else "")
