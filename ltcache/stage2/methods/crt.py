"""``crt``: classifier re-training, a fresh linear head on class-balanced batches (docs/methods.md#crt)."""
from __future__ import annotations

from ltcache.stage2.methods import BOT_REPO, CB_TRAIN_BN_GAP, BOT_SCRIPT, CRT_REPO, CRT_SCRIPT, START, register_method

register_method("crt", loss="ce", sampler="cb", init="fresh", presets=START,
                source="cRT config/*/cls_crt.yaml; BagofTricks cRT/cifar100_im100.yaml (docs/methods.md#crt)",
                notes="fresh nn.Linear head, ClassAwareSampler(4); scheduler stepped at each epoch's start, int(N/B) "
                      "batches (both scripts); cifar: BoT's warmup+step schedule replaced by cosine (not measured), "
                      "cRT's ClassAwareSampler(4) instead of BoT's class-uniform draw with replacement (bundled "
                      "CIFAR-10-LT cache, 5 seeds: 73.11 +- 0.06 vs 73.04 +- 0.07 with BoT's draw); the class "
                      "streams restart each epoch; cache gap at K = 10 (bundled cache, 3 seeds): the main features "
                      "over-state it by +1.25 (73.14 vs 71.89 through the backbone), tail classes up to +5.0 "
                      "(ship); the bn-eval set gives 71.65 (-0.24) but truck -6.0, the bn-b512 set 71.76 (-0.13), a "
                      "cache at its own BN batch (128) 72.60 (+0.71)" + CB_TRAIN_BN_GAP,
                cache_gap="+1.25 (K=10, 3 seeds)",
                steps="floor", scripts={"cifar": (BOT_SCRIPT + ", cRT/cifar100_im100.yaml", BOT_REPO),
                                        "imagenet": (CRT_SCRIPT + ", cls_crt.yaml", CRT_REPO)})
