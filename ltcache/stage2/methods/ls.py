"""``ls``: label smoothing, from the stage-1 head (docs/methods.md#ls)."""
from __future__ import annotations

from ltcache.stage2.methods import UNVERIFIED, linear_dim, register_method, space

register_method("ls", loss="ls",
                source="PyTorch label_smoothing (docs/methods.md#ls)", notes="from the stage-1 head; eps is free (0.1 stated default); " + UNVERIFIED,
                space=space(linear_dim("eps", 0.0, 0.5, "0.1 stated default (docs/methods.md#ls); LOS is eps near 1")))
