"""``cb``: the class-balanced softmax loss, from the stage-1 head (docs/methods.md#cb)."""
from __future__ import annotations

from ltcache.stage2.methods import BETA_DIM, UNVERIFIED, register_method, space

register_method("cb", loss="cb",
                source="class-balanced-loss (TF) src/cifar_main.py (docs/methods.md#cb)",
                notes="from the stage-1 head; softmax form, TF normalisation sum w_y CE / B; " + UNVERIFIED, space=space(BETA_DIM))
