"""Influence-balanced loss (Park et al., "Influence-Balanced Loss for Imbalanced Visual
Classification", ICCV 2021) as an ltcache plugin: a loss that reads the batch's features.

Each sample's class-weighted cross-entropy is divided by its influence, the product of the
logit gradient's size ||p - y||_1 and the feature's size ||h||_1:

    l_i = w_y CE(z_i, y_i) * alpha / (||softmax(z_i) - onehot(y_i)||_1 * ||h_i||_1 + 1e-3)

with w_j = (1 / n_j) normalised to sum to K, alpha = 1000 and the 1e-3 of the authors' code
(the influence is not detached there either). Their schedule trains with CE first and
switches to this loss; a cached stage-2 retrain starts from the CE-trained stage-1 head.

    ltcache tune  --plugin examples/ib_loss.py --methods ib,ce
    ltcache bench --plugin examples/ib_loss.py --methods ib,ce,la-loss
"""
import torch
import torch.nn.functional as F

import ltcache


@ltcache.register_loss("ib", params=[ltcache.Param("ib_alpha", float, lo=0, lo_open=True, default=1000.0,
                                                   help="IB: scale of the inverse influence")])
def influence_balanced(z, y, params, counts, h=None):
    """Cross-entropy re-weighted by the inverse influence of each sample."""
    k = z.shape[1]
    w = 1.0 / counts.clamp_min(1)
    w = w / w.sum() * k
    influence = (torch.softmax(z, 1) - F.one_hot(y, k)).abs().sum(1) * h.abs().sum(1)
    ce = F.cross_entropy(z, y, weight=w, reduction="none")
    return (ce * params["ib_alpha"] / (influence + 1e-3)).mean()


ltcache.register_method(
    "ib", loss="ib", presets={"epochs": 30, "lr": 0.1, "wd": 5e-4, "batch_size": 128},
    source="Park et al., ICCV 2021 (IBLoss of the authors' code)",
    notes="from the stage-1 head; loss reads the features (||h||_1); stage-2 budget: the cRT default",
    space=[ltcache.Dim("ib_alpha", "log", 100.0, 10000.0, source="alpha = 1000 in the authors' code")])
