"""``balanced-softmax``: BALMS's balanced softmax on a fresh linear head (docs/methods.md#balanced-softmax)."""
from __future__ import annotations

from ltcache.stage2.methods import BALMS_REPO, register_method

register_method("balanced-softmax", loss="balanced-softmax", init="fresh",
                presets={"cifar": dict(lr=0.1, wd=5e-4, batch_size=512, epochs=None, iterations=2000,
                                       schedule="cosine-start", momentum=0.9),
                         "imagenet": dict(lr=0.4, wd=5e-4, epochs=10, batch_size=512, schedule="cosine-start",
                                          momentum=0.9)},
                source="BALMS config/*/decouple_balanced_softmax*.yaml (docs/methods.md#balanced-softmax)",
                notes="fresh nn.Linear head; CIFAR: 2000 iterations -> epochs = ceil(2000 / ceil(N/B)) (IF200 config; IF100 "
                      "UNVERIFIED); BALMS's loop: scheduler stepped at each epoch's start, int(N/B) batches an epoch; "
                      "BN in train mode on batches of 512, so it trains on the cache's bn-b512 set (BN batch "
                      "statistics of 512 images) when the cache has one (the bundled cache does): 74.57 vs 74.73 "
                      "through the backbone, -0.16, 3 seeds, truck -2.0; on the main features (BN batches of 64) "
                      "+0.59, ship +3.3",
                feature_sets={"*": "bn-b512"}, cache_gap="-0.16 on bn-b512 (K=10, 3 seeds)",
                steps="floor", scripts=("BALMS run_networks.py, decouple_balanced_softmax*.yaml", BALMS_REPO))
