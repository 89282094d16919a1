"""``ldam-drw``: LDAM with class-balanced re-weighting on a fresh cosine head (docs/methods.md#ldam-drw)."""
from __future__ import annotations

from ltcache.stage2.methods import BETA_DIM, LDAM_MARGIN_DIM, LDAM_SCALE_DIM, SCALE, UNVERIFIED, register_method, space

register_method("ldam-drw", head="cosine", loss="ldam-drw", init="fresh", params=(SCALE,),
                tunables=("margin", "scale", "beta"), presets=dict(scale=30.0),
                source="LDAM-DRW losses.py, cifar_train.py (docs/methods.md#ldam-drw)",
                notes="fresh cosine head (unit rows); DRW = CB weights (beta) for the whole re-training, PyTorch weighted mean; " + UNVERIFIED,
                space=space(LDAM_MARGIN_DIM, LDAM_SCALE_DIM, BETA_DIM))
