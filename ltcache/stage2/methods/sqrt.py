"""``sqrt``: a fresh linear head on square-root-sampled batches (docs/methods.md#sqrt)."""
from __future__ import annotations

from ltcache.stage2.methods import CRT_REPO, CRT_SCRIPT, START, register_method

register_method("sqrt", loss="ce", sampler="sqrt", init="fresh", presets=START,
                source="cRT MixedPrioritizedSampler nroot=2 (docs/methods.md#sqrt)",
                notes="fresh nn.Linear head; no stage-2 config in the source: cRT values (UNVERIFIED); cRT's loop: "
                      "scheduler stepped at each epoch's start, int(N/B) batches",
                steps="floor", scripts=(CRT_SCRIPT, CRT_REPO))
