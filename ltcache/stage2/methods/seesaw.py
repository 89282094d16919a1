"""``seesaw``: the Seesaw loss with static class counts, from the stage-1 head (docs/methods.md#seesaw)."""
from __future__ import annotations

from ltcache.stage2.methods import UNVERIFIED, linear_dim, register_method, space

register_method("seesaw", loss="seesaw",
                source="mmdet seesaw_loss.py (docs/methods.md#seesaw)", notes="from the stage-1 head; static class counts instead of cumulative; " + UNVERIFIED,
                space=space(linear_dim("p", 0.0, 1.5, "p = 0.8 (docs/methods.md#seesaw)"),
                            linear_dim("q", 0.0, 3.0, "q = 2 (docs/methods.md#seesaw)")))
