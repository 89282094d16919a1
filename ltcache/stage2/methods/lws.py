"""``lws``: learnable weight scaling of the frozen stage-1 head (docs/methods.md#lws)."""
from __future__ import annotations

from ltcache.stage2.methods import BOT_REPO, BOT_SCRIPT, CRT_REPO, CRT_SCRIPT, START, register_method

register_method("lws", head="lws", loss="ce", sampler="cb",
                presets={"cifar": START, "imagenet": dict(epochs=5, **START)},
                source="cRT cls_lws.yaml, TauNormClassifier.py; BoT LWS/cifar100_im100.yaml (docs/methods.md#lws)",
                notes="s in R^K on the frozen stage-1 W, b (bias scaled too); wd applies to s; scheduler stepped at each "
                      "epoch's start, int(N/B) batches (both scripts); cifar: BoT's warmup+step schedule replaced by "
                      "cosine (not measured), cRT's ClassAwareSampler(4) instead of BoT's class-uniform draw (bundled "
                      "cache, 5 seeds: 72.82 +- 0.12 vs 72.93 +- 0.08 with BoT's draw); the class streams restart "
                      "each epoch",
                steps="floor", scripts={"cifar": (BOT_SCRIPT + ", LWS/cifar100_im100.yaml", BOT_REPO),
                                        "imagenet": (CRT_SCRIPT + ", cls_lws.yaml", CRT_REPO)})
