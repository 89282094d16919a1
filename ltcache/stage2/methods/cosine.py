"""``cosine``: a fresh cosine head with scale s, trained with CE (docs/methods.md#cosine)."""
from __future__ import annotations

from ltcache.stage2.methods import SCALE, UNVERIFIED, log_dim, register_method, space

register_method("cosine", head="cosine", loss="ce", init="fresh", params=(SCALE,), presets=dict(scale=16.0),
                source="cRT CosNormClassifier (s=16) / LDAM NormedLinear (docs/methods.md#cosine)",
                notes="z = s cos(f, w_j), no squash, unit-row fresh init; " + UNVERIFIED,
                space=space(log_dim("scale", 4.0, 64.0, "cRT s=16, LDAM s=30 (docs/methods.md#cosine)")))
