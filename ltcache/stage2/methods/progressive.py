"""``progressive``: a fresh linear head, instance- to class-balanced over the epochs (docs/methods.md#progressive)."""
from __future__ import annotations

from ltcache.stage2.methods import BOT_REPO, BOT_SCRIPT, CRT_REPO, CRT_SCRIPT, START, register_method

register_method("progressive", loss="ce", sampler="progressive", init="fresh", presets=START,
                source="cRT feat_shift.yaml / BoT progressive (docs/methods.md#progressive)",
                notes="fresh nn.Linear head; cRT values (UNVERIFIED as stage 2); scheduler stepped at each epoch's start, "
                      "int(N/B) batches (both scripts); balanced weight linspace(0, 1, E) (cRT ClassPrioritySampler) on "
                      "both presets: BoT's (e+1)/E (1-based epochs, also 1 at the end) is not used (bundled cache, "
                      "5 seeds: 72.90 +- 0.09 vs 72.85 +- 0.07 with BoT's); draws with replacement inside a class "
                      "(cRT cycles a per-class permutation)",
                steps="floor", scripts={"cifar": (BOT_SCRIPT + ", lib/dataset/cao_cifar.py", BOT_REPO),
                                        "imagenet": (CRT_SCRIPT + ", data/ClassPrioritySampler.py", CRT_REPO)})
