"""``vs``: the vector-scaling loss, from the stage-1 head (docs/methods.md#vs)."""
from __future__ import annotations

from ltcache.stage2.methods import UNVERIFIED, linear_dim, register_method, space

# imagenet: the loss's defaults (the VS-Loss parser's gamma 0.3, tau 1.0)
register_method("vs", loss="vs", presets={"cifar": dict(gamma=0.2, tau=1.2)},
                source="VS-Loss class_imbalance/losses.py (docs/methods.md#vs)",
                notes="from the stage-1 head; cifar: README CIFAR-10 example; imagenet: parser defaults; " + UNVERIFIED,
                space=space(linear_dim("gamma", 0.0, 0.5, "0.2 (README CIFAR-10), 0.3 (parser) (docs/methods.md#vs)"),
                            linear_dim("tau", 0.0, 2.0, "1.2 (README CIFAR-10), 1.0 (parser) (docs/methods.md#vs)")))
