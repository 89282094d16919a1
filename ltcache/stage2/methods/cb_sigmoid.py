"""``cb-sigmoid``: the class-balanced sigmoid loss (docs/methods.md#cb-sigmoid)."""
from __future__ import annotations

from ltcache.stage2.methods import BETA_DIM, CB_REPO, UNVERIFIED, register_method, space

register_method("cb-sigmoid", loss="cb-sigmoid", sigmoid_bias=True,
                source="class-balanced-loss (TF) sigmoid (docs/methods.md#cb-sigmoid)",
                notes="W from the stage-1 head, bias init -log(K-1), no weight decay on the bias (the script's "
                      "regularisation); " + UNVERIFIED,
                no_wd=("b",), scripts=("class-balanced-loss src/cifar_main.py (loss, bias init, bias decay)", CB_REPO),
                space=space(BETA_DIM))
