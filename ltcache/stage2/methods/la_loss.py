"""``la-loss``: the logit-adjusted loss, from the stage-1 head (docs/methods.md#la-loss)."""
from __future__ import annotations

from ltcache.stage2.methods import UNVERIFIED, linear_dim, register_method, space

register_method("la-loss", loss="la",
                source="google-research logit_adjustment (docs/methods.md#la-loss)", notes="from the stage-1 head; " + UNVERIFIED,
                space=space(linear_dim("tau", 0.0, 2.0, "tau = 1 (docs/methods.md#la-loss); 0 = plain CE")))
