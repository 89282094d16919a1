"""``cb-focal``: the class-balanced sigmoid focal loss (docs/methods.md#cb-focal)."""
from __future__ import annotations

from ltcache.stage2.methods import BETA_DIM, CB_REPO, UNVERIFIED, linear_dim, register_method, space

register_method("cb-focal", loss="cb-focal", sigmoid_bias=True,
                source="class-balanced-loss (TF) sigmoid focal (docs/methods.md#cb-focal)",
                notes="W from the stage-1 head, bias init -log(K-1), no weight decay on the bias (the script's "
                      "regularisation); " + UNVERIFIED,
                no_wd=("b",), scripts=("class-balanced-loss src/cifar_main.py (loss, bias init, bias decay)", CB_REPO),
                space=space(BETA_DIM, linear_dim("gamma", 0.0, 3.0, "gamma = 1 (CB script), 2 (original focal) (docs/methods.md#cb-focal)")))
