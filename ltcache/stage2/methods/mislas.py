"""``mislas``: label-aware smoothing with the MiSLAS head (docs/methods.md#mislas)."""
from __future__ import annotations

from ltcache.stage2.methods import MISLAS_REPO, Param, linear_dim, log_dim, register_method, space

LR_FACTOR = Param("lr_factor", float, lo=0, help="MiSLAS lr ratio of W, b")

register_method("mislas", head="mislas", loss="las", sampler="cb", params=(LR_FACTOR,),
                presets={"cifar": dict(lr=0.1, wd=2e-4, epochs=10, batch_size=128, schedule="cosine", momentum=0.9,
                                       eps_head=0.4, eps_tail=0.1, shape="concave", lr_factor=0.2),
                         "imagenet": dict(lr=0.1, wd=5e-4, epochs=10, batch_size=256, schedule="cosine", momentum=0.9,
                                          eps_head=0.3, eps_tail=0.0, shape="concave", lr_factor=0.05)},
                source="MiSLAS config/*/*_stage2_mislas.yaml (docs/methods.md#mislas)",
                notes="from the stage-1 head; cifar = CIFAR-100 IF100 row (CIFAR-10 IF100: eps 0.3/0.0, "
                      "lr_factor 0.5); BN shift not reproducible on a cache; ceil(N/B) + 1 class-balanced batches an "
                      "epoch (the script's `if i > end_steps: break`); the class and per-class streams restart each "
                      "epoch; at K = 10 MiSLAS keeps BN in eval mode (its CIFAR-10 configs: shift_bn False), so it "
                      "trains on the cache's bn-eval feature set when the cache has one (the bundled cache does: "
                      "74.68 vs 74.84 through the backbone, 3 seeds, -0.16); on the main (batch-BN, shifted) "
                      "features it is over-stated by +0.83 (75.67); add the set with ltcache extract --set bn-eval",
                feature_sets={10: "bn-eval"},
                steps="ceil+1", scripts=("MiSLAS train_stage2.py, datasets/sampler.py", MISLAS_REPO),
                space=space(linear_dim("eps_head", 0.0, 0.5, "0.2-0.4 in the MiSLAS configs (docs/methods.md#mislas)"),
                            linear_dim("eps_tail", 0.0, 0.2, "0.0-0.1 in the MiSLAS configs (docs/methods.md#mislas)"),
                            log_dim("lr_factor", 0.05, 0.5, "0.05-0.5 in the MiSLAS configs (docs/methods.md#mislas)")),
                cache_gap="-0.16 on bn-eval (K=10, 3 seeds)")
