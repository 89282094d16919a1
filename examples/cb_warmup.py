"""Class-balanced sampling with a linear warm-up from instance-balanced, as an ltcache plugin:
a sampler of your own.

At epoch e of E a sample of class j is drawn with probability proportional to

    (1 - a) / N + a / (K n_j),   a = min(1, e / ceil(E / 2))

so the first epoch is instance-balanced, and from the middle of training on every class is
equally likely. N draws with replacement per epoch; the engine cuts them into batches by the
method's step rule (here ceil(N/B), the last batch short).

    ltcache tune --plugin examples/cb_warmup.py --methods cb-warmup,crt,ce
"""
import math

import torch

import ltcache


@ltcache.register_sampler("cb-warmup")
def cb_warmup(ci, epoch, epochs, g):
    """One epoch's draws of train indices (ci: labels, class counts)."""
    a = min(1.0, epoch / max(1, math.ceil(epochs / 2)))
    k = len(ci.counts)
    p = (1 - a) / ci.n + a / (k * ci.counts.double().clamp_min(1))[ci.labels]
    return torch.multinomial(p.float(), ci.n, replacement=True, generator=g)


ltcache.register_method(
    "cb-warmup", loss="ce", sampler="cb-warmup", init="fresh",
    presets={"epochs": 30, "lr": 0.1, "wd": 5e-4, "batch_size": 128},
    source="cRT class-balanced sampling, reached by a linear warm-up from instance-balanced",
    notes="fresh nn.Linear head, as cRT")
