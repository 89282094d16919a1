"""``maxnorm``: LTWB's class-balanced loss with weight decay and the MaxNorm projection (docs/methods.md#maxnorm)."""
from __future__ import annotations

from ltcache.stage2.methods import LTWB_CIFAR, LTWB_REPO, START, Param, linear_dim, log_dim, register_method, space

MAXNORM_THRESH = Param("maxnorm_thresh", float, lo=0, default=0.1, help="LTWB MaxNorm threshold")

register_method("maxnorm", loss="ltwb-cb", params=(MAXNORM_THRESH,), presets=dict(LTWB_CIFAR, **START),
                source="LTWB demo2_second-stage-training.py, utils/regularizers.py (docs/methods.md#maxnorm)",
                notes="from the stage-1 head; CB 'softmax' = BCE on softmax, wd 0.1, MaxNorm once per epoch; scheduler "
                      "stepped at each epoch's start (utils/trainval.py); ImageNet UNVERIFIED (CIFAR values)",
                scripts=("LTWB demo2_second-stage-training.py, utils/trainval.py, utils/regularizers.py", LTWB_REPO),
                space=space(linear_dim("maxnorm_thresh", 0.0, 0.5, "thresh = 0.1 (docs/methods.md#maxnorm)"),
                            log_dim("wd", 1e-3, 1.0, "LTWB's wd 0.1 was chosen by grid search (docs/methods.md#maxnorm)")))
