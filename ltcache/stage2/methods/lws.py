"""``lws``: learnable weight scaling of the frozen stage-1 head (docs/methods.md#lws)."""
from __future__ import annotations

from ltcache.stage2.methods import BOT_REPO, BOT_SCRIPT, CB_TRAIN_BN_GAP, CRT_REPO, CRT_SCRIPT, START, register_method

register_method("lws", head="lws", loss="ce", sampler="cb",
                presets={"cifar": START, "imagenet": dict(epochs=5, **START)},
                source="cRT cls_lws.yaml, TauNormClassifier.py; BoT LWS/cifar100_im100.yaml (docs/methods.md#lws)",
                notes="s in R^K on the frozen stage-1 W, b (bias scaled too); wd applies to s; scheduler stepped at each "
                      "epoch's start, int(N/B) batches (both scripts); cifar: BoT's warmup+step schedule replaced by "
                      "cosine (not measured), cRT's ClassAwareSampler(4) instead of BoT's class-uniform draw (bundled "
                      "cache, 5 seeds: 72.82 +- 0.12 vs 72.93 +- 0.08 with BoT's draw); the class streams restart "
                      "each epoch; cache gap at K = 10 (bundled cache, 3 seeds): the main features over-state it "
                      "by +4.16 (72.79 vs 68.63 through the backbone), every class from deer to truck +3.6 to "
                      "+10.5; the bn-eval set +2.45 (71.08), the bn-b512 set +2.41; the frozen stage-1 W, b only rescaled cannot follow "
                      "the drifted features" + CB_TRAIN_BN_GAP,
                cache_gap="+4.16 (K=10, 3 seeds)",
                steps="floor", scripts={"cifar": (BOT_SCRIPT + ", LWS/cifar100_im100.yaml", BOT_REPO),
                                        "imagenet": (CRT_SCRIPT + ", cls_lws.yaml", CRT_REPO)})
