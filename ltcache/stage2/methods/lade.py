"""``lade``: PriorCE plus the LADE regulariser, from the stage-1 head (docs/methods.md#lade)."""
from __future__ import annotations

from ltcache.stage2.methods import UNVERIFIED, log_dim, register_method, space

register_method("lade", loss="lade", presets={"cifar": dict(alpha=0.1, lam=0.01), "imagenet": dict(alpha=0.05, lam=0.5)},
                source="hyperconnect/LADE loss/LADELoss.py, README (docs/methods.md#lade)", notes="from the stage-1 head; PriorCE + alpha LADER; " + UNVERIFIED,
                space=space(log_dim("alpha", 0.005, 0.5, "0.005-0.1 in the LADE README (docs/methods.md#lade)"),
                            log_dim("lam", 0.005, 1.0, "0.01-0.5 in the LADE README (docs/methods.md#lade)")))
