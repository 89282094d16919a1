"""``marc``: MARC's per-class affine on the frozen stage-1 head with the GRW loss (docs/methods.md#marc)."""
from __future__ import annotations

from ltcache.stage2.methods import linear_dim, register_method, space

register_method("marc", head="marc", loss="grw",
                source="MARC official code MARCLinear + GRWCrossEntropyLoss (docs/methods.md#marc)",
                notes="a z + b ||w|| on the frozen stage-1 head, GRW exponent 1.2 (code default); sampler/epochs/lr UNVERIFIED: stated default",
                space=space(linear_dim("rho", 0.0, 2.0, "exp_scale 1.2 (docs/methods.md#marc)")))
