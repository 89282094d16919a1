"""The fallback's steady state (one traced TorchScript graph per run and pattern of valid samples)
gives every member the gradient of autograd on its own plain forward, call after call, whatever
the pattern (full batches, a short last batch, a member sitting a step out, two runs with their
own hyper-parameters, a loss reading the features); a forward that cannot be traced still trains,
through eager autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ltcache
from ltcache.plugins import isolated_registry
from ltcache.stage2.losses import build_loss
from ltcache.stage2.losses._fallback import AutogradLossGrad

torch.set_num_threads(1)
K, B, D = 5, 16, 4
COUNTS = torch.tensor([40, 20, 10, 5, 2])


def poly(z, y, params):
    ce = F.cross_entropy(z, y, reduction="none")
    p_y = torch.softmax(z, -1).gather(1, y[:, None]).squeeze(1)
    return (ce + params["eps"] * (1 - p_y)).mean()


def la_focal(z, y, params, counts):
    ce = F.cross_entropy(z + params["tau"] * torch.log(counts / counts.sum()), y, reduction="none")
    return ((1 - torch.exp(-ce)).clamp_min(1e-12) ** 2.0 * ce).mean()


def feat(z, y, params, counts, h=None):
    return (F.cross_entropy(z, y, reduction="none") * (1 + h.abs().sum(1))).mean()


def branchy(z, y, params):
    if bool((z > 0).all()):                      # data-dependent control flow: not traceable
        return F.cross_entropy(z, y)
    return F.cross_entropy(z, y, label_smoothing=0.1)


@pytest.fixture(autouse=True)
def registry():
    with isolated_registry():
        ltcache.register_loss("t-poly", params=[ltcache.Param("eps", float, lo=-1)])(poly)
        ltcache.register_loss("t-la-focal", params=[ltcache.Param("tau", float, lo=0)])(la_focal)
        ltcache.register_loss("t-feat")(feat)
        ltcache.register_loss("t-branchy")(branchy)
        yield


def reference(fn, params, z, y, n_valid, h=None):
    """dL/dz [m, K, B] of each member's own forward on its valid samples, by autograd."""
    out = torch.zeros_like(z)
    for i, n in enumerate(n_valid):
        if n == 0:
            continue
        zi = z[i, :, :n].t().detach().requires_grad_(True)
        kw = {"h": h[i, :n]} if h is not None else {}
        args = (params, COUNTS.float()) if fn in (la_focal, feat) else (params,)
        out[i, :, :n] = torch.autograd.grad(fn(zi, y[i, :n], *args, **kw), zi)[0].t()
    return out


PATTERNS = [[B] * 5, [B] * 5, [B - 3] * 5, [B, 0, B, B, B], [B] * 5, [B - 3] * 5, [B] * 5]


@pytest.mark.parametrize("name,fn,runs", [
    ("t-poly", poly, [{"eps": 1.0}, {"eps": 0.5}]),
    ("t-la-focal", la_focal, [{"tau": 1.0}]),
    ("t-feat", feat, [{}]),
    ("t-branchy", branchy, [{}]),
])
def test_steady_state_equals_autograd_per_member(name, fn, runs):
    per_run = 5 // len(runs) + (5 % len(runs) > 0)
    params = [runs[min(i // per_run, len(runs) - 1)] for i in range(5)]
    specs = [build_loss(name, p, COUNTS) for p in params]
    fb = AutogradLossGrad(specs, ["m"] * 5, COUNTS, "cpu")
    g = torch.Generator().manual_seed(0)
    for n_valid in PATTERNS:
        z = torch.randn(5, K, B, generator=g) * 3
        y = torch.randint(K, (5, B), generator=g)
        h = torch.randn(5, B, D, generator=g) if name == "t-feat" else None
        valid = (torch.arange(B)[None] < torch.tensor(n_valid)[:, None]).float()
        got = fb(z, y, valid, list(n_valid), True, h=h)
        want = torch.cat([reference(fn, params[i], z[i:i + 1], y[i:i + 1], n_valid[i:i + 1],
                                    None if h is None else h[i:i + 1]) for i in range(5)])
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (name, n_valid, float((got - want).abs().max()))
    if name != "t-branchy":
        assert fb._plans, "the steady-state path was not taken"
