"""``ldam``: the LDAM loss on a fresh cosine head (docs/methods.md#ldam)."""
from __future__ import annotations

from ltcache.stage2.methods import LDAM_MARGIN_DIM, LDAM_SCALE_DIM, SCALE, UNVERIFIED, register_method, space

register_method("ldam", head="cosine", loss="ldam", init="fresh", params=(SCALE,), presets=dict(scale=30.0),
                source="LDAM-DRW losses.py (docs/methods.md#ldam)",
                notes="fresh cosine head (unit rows); s (cos - m_y), m_j = 0.5 (n_min/n_j)^(1/4); " + UNVERIFIED,
                space=space(LDAM_MARGIN_DIM, LDAM_SCALE_DIM))
