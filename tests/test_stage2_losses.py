"""Each stage-2 loss against its formula computed directly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltcache.stage2 import losses as L
from ltcache.stage2.checks import loss_params

torch.set_num_threads(1)
COUNTS = torch.tensor([200, 80, 30, 10, 4])
K = 5


def one(kind, params=None, z=None, y=None, valid=None, scale=1.0):
    spec = L.build_loss(kind, params or {}, COUNTS, scale=scale)
    lb = L.stack_specs([spec], COUNTS, "cpu")
    return L.batched_loss(z.unsqueeze(0), y.unsqueeze(0), valid.unsqueeze(0).float(), lb)[0]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, K, generator=g) * 2
    y = torch.randint(K, (12,), generator=g)
    return z, y, torch.ones(12)


def test_ce_ls_los(batch):
    z, y, v = batch
    assert one("ce", z=z, y=y, valid=v) == pytest.approx(float(F.cross_entropy(z, y)), abs=1e-6)
    assert one("ls", {"eps": 0.2}, z, y, v) == pytest.approx(float(F.cross_entropy(z, y, label_smoothing=0.2)), abs=1e-6)
    assert one("los", {"delta": 0.98}, z, y, v) == pytest.approx(
        float(F.cross_entropy(z, y, label_smoothing=0.98)), abs=1e-6)


def test_padding_equals_smaller_batch(batch):
    z, y, v = batch
    v = v.clone()
    v[8:] = 0
    assert one("los", {"delta": 0.5}, z, y, v) == pytest.approx(
        float(F.cross_entropy(z[:8], y[:8], label_smoothing=0.5)), abs=1e-6)


def test_offsets_balanced_softmax_la_vs(batch):
    z, y, v = batch
    logn = COUNTS.double().log().float()
    logpi = (COUNTS.double() / COUNTS.sum()).log().float()
    assert one("balanced-softmax", z=z, y=y, valid=v) == pytest.approx(float(F.cross_entropy(z + logn, y)), abs=1e-5)
    assert one("la", {"tau": 1.5}, z, y, v) == pytest.approx(float(F.cross_entropy(z + 1.5 * logpi, y)), abs=1e-5)
    mult = (COUNTS.double() / COUNTS.max()).pow(0.3).float()
    assert one("vs", {"gamma": 0.3, "tau": 1.2}, z, y, v) == pytest.approx(
        float(F.cross_entropy(z * mult + 1.2 * logpi, y)), abs=1e-5)


def test_ldam_margins_and_loss(batch):
    z, y, v = batch
    m = L.ldam_margins(COUNTS, 0.5)
    expect = 0.5 * (COUNTS.min().double() / COUNTS.double()).pow(0.25)
    assert torch.allclose(m.double(), expect, atol=1e-6) and float(m.max()) == pytest.approx(0.5)
    cos = torch.tanh(z)
    u = 30 * (cos - F.one_hot(y, K) * m[y].unsqueeze(1))
    assert one("ldam", {"margin": 0.5}, 30 * cos, y, v, scale=30) == pytest.approx(float(F.cross_entropy(u, y)), rel=1e-5)
    w = L.class_balanced_weights(COUNTS, 0.9999)
    assert one("ldam-drw", {"margin": 0.5, "beta": 0.9999}, 30 * cos, y, v, scale=30) == pytest.approx(
        float(F.cross_entropy(u, y, weight=w)), rel=1e-5)


def test_label_aware_eps_shapes():
    n = COUNTS.double()
    r = (n - n.min()) / (n.max() - n.min())
    concave = L.label_aware_eps(COUNTS, 0.4, 0.1, "concave")
    linear = L.label_aware_eps(COUNTS, 0.4, 0.1, "linear")
    convex = L.label_aware_eps(COUNTS, 0.4, 0.1, "convex")
    assert torch.allclose(concave.double(), 0.1 + 0.3 * torch.sin(math.pi * r / 2), atol=1e-6)
    assert torch.allclose(linear.double(), 0.1 + 0.3 * r, atol=1e-6)
    assert torch.allclose(convex.double(), 0.4 + 0.3 * torch.sin(1.5 * math.pi + math.pi * r / 2), atol=1e-6)
    for e in (concave, linear, convex):          # head gets eps_head, tail gets eps_tail
        assert float(e[0]) == pytest.approx(0.4) and float(e[-1]) == pytest.approx(0.1)
    assert float(concave[2]) > float(linear[2]) > float(convex[2])


def test_las_loss(batch):
    z, y, v = batch
    eps = L.label_aware_eps(COUNTS, 0.3, 0.0, "linear")
    lp = F.log_softmax(z, 1)
    expect = ((1 - eps[y]) * -lp.gather(1, y[:, None]).squeeze(1) + eps[y] * -lp.mean(1)).mean()
    assert one("las", {"eps_head": 0.3, "eps_tail": 0.0, "shape": "linear"}, z, y, v) == pytest.approx(float(expect), abs=1e-6)


def test_focal_ldam_form(batch):
    z, y, v = batch
    ce = F.cross_entropy(z, y, reduction="none")
    expect = ((1 - torch.exp(-ce)) ** 2.0 * ce).mean()
    assert one("focal", {"gamma": 2.0}, z, y, v) == pytest.approx(float(expect), abs=1e-6)


def test_class_balanced_weights_and_tf_normalisation(batch):
    z, y, v = batch
    w = L.class_balanced_weights(COUNTS, 0.999)
    raw = (1 - 0.999) / (1 - 0.999 ** COUNTS.double())
    assert float(w.sum()) == pytest.approx(K, abs=1e-5)
    assert torch.allclose(w.double(), raw / raw.sum() * K, atol=1e-6)
    ce = F.cross_entropy(z, y, reduction="none")
    assert one("cb", {"beta": 0.999}, z, y, v) == pytest.approx(float((w[y] * ce).sum() / len(y)), abs=1e-5)


def test_cb_sigmoid_and_focal(batch):
    z, y, v = batch
    w = L.class_balanced_weights(COUNTS, 0.99)
    t = F.one_hot(y, K).float()
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    assert one("cb-sigmoid", {"beta": 0.99}, z, y, v) == pytest.approx(float((w[y, None] * bce).sum() / 12), rel=1e-5)
    p = torch.sigmoid(z)
    mod = torch.where(t > 0, (1 - p) ** 1.5, p ** 1.5)
    assert one("cb-focal", {"beta": 0.99, "gamma": 1.5}, z, y, v) == pytest.approx(
        float((w[y, None] * mod * bce).sum() / 12), rel=1e-5)


def test_ltwb_bce_on_softmax(batch):
    z, y, v = batch
    w = L.class_balanced_weights(COUNTS, 0.9999)
    expect = F.binary_cross_entropy(F.softmax(z, 1), F.one_hot(y, K).float(), weight=w[y, None].expand(-1, K))
    assert one("ltwb-cb", {"beta": 0.9999}, z, y, v) == pytest.approx(float(expect), rel=1e-5)


def test_grw_weighted_mean(batch):
    z, y, v = batch
    u = L.grw_weights(COUNTS, 1.2)
    pi = COUNTS.double() / COUNTS.sum()
    assert torch.allclose(u.double(), pi ** -1.2 / (pi ** -1.2).sum() * K, atol=1e-5)
    assert one("grw", {"rho": 1.2}, z, y, v) == pytest.approx(float(F.cross_entropy(z, y, weight=u)), rel=1e-5)


def test_seesaw(batch):
    z, y, v = batch
    n = COUNTS.double()
    sig = F.softmax(z, 1).double()
    mitig = torch.where(n[None, :] < n[y][:, None], (n[None, :] / n[y][:, None]) ** 0.8, torch.ones(1, dtype=torch.double))
    ratio = sig / sig.gather(1, y[:, None]).clamp_min(1e-2)
    comp = torch.where(ratio > 1, ratio ** 2.0, torch.ones(1, dtype=torch.double))
    onehot = F.one_hot(y, K).double()
    zt = z.double() + (mitig * comp).log() * (1 - onehot)
    assert one("seesaw", {"p": 0.8, "q": 2.0}, z, y, v) == pytest.approx(float(F.cross_entropy(zt, y)), rel=1e-5)


def test_lade(batch):
    z, y, v = batch
    pi = COUNTS.double() / COUNTS.sum()
    prior_ce = F.cross_entropy(z.double() + (pi + 1e-9).log(), y)
    onehot = F.one_hot(y, K).double()
    t1 = (z.double() * onehot).sum(0) / (onehot.sum(0) + 1e-8)
    t2 = torch.logsumexp(z.double() - (pi + 1e-9).log() + math.log(1 / K), 0) - math.log(12)
    est = t1 - t2 - 0.5 * t2 ** 2
    expect = prior_ce + 0.1 * -(est * pi).sum()
    assert one("lade", {"alpha": 0.1, "lam": 0.5}, z, y, v) == pytest.approx(float(expect), rel=1e-5)


def test_mixed_specs_in_one_batch_match_each_alone(batch):
    z, y, v = batch
    kinds = [("ce", {}), ("focal", {"gamma": 1.0}), ("ltwb-cb", {"beta": 0.99}), ("cb-focal", {"beta": 0.9, "gamma": 1.0}),
             ("seesaw", {"p": 0.8, "q": 2.0}), ("lade", {"alpha": 0.1, "lam": 0.01}), ("las", {"eps_head": 0.4, "eps_tail": 0.1})]
    specs = [L.build_loss(k, p, COUNTS) for k, p in kinds]
    lb = L.stack_specs(specs, COUNTS, "cpu")
    m = len(specs)
    got = L.batched_loss(z.expand(m, -1, -1), y.expand(m, -1), v.expand(m, -1), lb)
    for i, (k, p) in enumerate(kinds):
        assert float(got[i]) == pytest.approx(float(one(k, p, z, y, v)), abs=1e-5), k


# every registered loss with a batched form (from the registry: a new loss is in the mixed checks by
# being registered), at a preset's values, plus a second focal gamma
ALL_KINDS = ([(name, loss_params(name)) for name, unit in L.LOSSES.items() if unit.spec is not None]
             + [("focal", {"gamma": 0.5})])


@pytest.mark.parametrize("subset", ["all", "sorted", "softmax-only", "inactive-config"])
def test_analytic_gradient_equals_autograd(subset):
    """The engine trains with batched_loss_grad: it must be the exact gradient of batched_loss,
    for every form mixed in one batch, with padding and with logits large enough to hit the clamps
    (the gradient works in the engine's class-major layout [M, K, B])."""
    kinds = ALL_KINDS
    if subset == "softmax-only":
        kinds = [kp for kp in ALL_KINDS if kp[0] in ("ce", "los", "la", "ldam", "grw")]
    specs = [L.build_loss(k, p, COUNTS, scale=30.0 if k.startswith("ldam") else 1.0) for k, p in kinds]
    if subset == "sorted":                 # the engine's order: each optional term on a tight slice
        specs.sort(key=L.loss_signature)
    lb = L.stack_specs(specs, COUNTS, "cpu", dtype=torch.float64)
    m, b = len(specs), 16
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(m, b, K, generator=g, dtype=torch.float64) * 4)
    z[:, 0] = torch.tensor([60.0, -60.0, 0.0, 0.0, 0.0], dtype=torch.float64)     # near-certain softmax
    y = torch.randint(K, (m, b), generator=g)
    valid = torch.ones(m, b, dtype=torch.float64)
    valid[:, -3:] = 0                                                              # a short batch
    if subset == "inactive-config":
        valid[1] = 0                                                               # an inactive configuration
    z.requires_grad_(True)
    auto, = torch.autograd.grad(L.batched_loss(z, y, valid, lb).sum(), z)
    ours = L.batched_loss_grad(z.detach().transpose(1, 2).contiguous(), y, valid, lb).transpose(1, 2)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, auto, atol=1e-10, rtol=1e-8), (ours - auto).abs().amax(dim=(1, 2))


# --------------------------------------------------------------------------------------------
# Poly-1 (Leng et al., ICLR 2022): CE + epsilon (1 - p_y), a per-sample term of its own
# --------------------------------------------------------------------------------------------

def test_poly1_value(batch):
    z, y, v = batch
    p_y = F.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    for eps in (1.0, 2.0, -1.0):
        expect = F.cross_entropy(z, y) + eps * (1 - p_y).mean()
        assert one("poly1", {"epsilon": eps}, z, y, v) == pytest.approx(float(expect), abs=1e-6)
    assert one("poly1", {}, z, y, v) == pytest.approx(float(F.cross_entropy(z, y) + (1 - p_y).mean()), abs=1e-6)


def padded_batch(m: int, seed: int, scale: float, inactive: int, b: int = 16):
    """float64 logits z [m, b, K] (requiring grad), labels and a validity mask whose last 3
    samples are padding and whose member ``inactive`` has no valid sample."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, b, K, generator=g, dtype=torch.float64) * scale
    y = torch.randint(K, (m, b), generator=g)
    valid = torch.ones(m, b, dtype=torch.float64)
    valid[:, -3:] = 0
    valid[inactive] = 0
    return z.requires_grad_(True), y, valid


@pytest.mark.parametrize("mixed", [False, True])
def test_poly1_analytic_gradient_equals_autograd(mixed):
    """d/dz_j of epsilon (1 - p_y) is -epsilon p_y (1[j=y] - p_j): alone, and in a batch with every
    other loss (padding, an inactive configuration, logits that hit the clamps)."""
    kinds = [("poly1", {"epsilon": 1.0}), ("poly1", {"epsilon": 2.5}), ("poly1", {"epsilon": -1.0})]
    if mixed:
        kinds = ALL_KINDS[:8] + kinds + ALL_KINDS[8:]
    specs = [L.build_loss(k, p, COUNTS, scale=30.0 if k.startswith("ldam") else 1.0) for k, p in kinds]
    lb = L.stack_specs(specs, COUNTS, "cpu", dtype=torch.float64)
    z, y, valid = padded_batch(len(specs), seed=5, scale=4.0, inactive=1)
    z.detach()[:, 0] = torch.tensor([60.0, -60.0, 0.0, 0.0, 0.0], dtype=torch.float64)   # the clamps
    auto, = torch.autograd.grad(L.batched_loss(z, y, valid, lb).sum(), z)
    ours = L.batched_loss_grad(z.detach().transpose(1, 2).contiguous(), y, valid, lb).transpose(1, 2)
    assert torch.allclose(ours, auto, atol=1e-10, rtol=1e-8), (ours - auto).abs().amax(dim=(1, 2))


def test_poly1_end_to_end():
    """``poly1`` retrains on a cache, and the engine's training (analytic loss gradient, hand-written
    head backward, fused SGD) equals autograd + torch.optim.SGD on the loss definition."""
    from ltcache.stage2 import api
    from ltcache.stage2.sweep import train_sweep
    from test_stage2_engine import autograd_reference, configs_for, data_of, fake_cache

    cache = fake_cache()
    res = api.retrain(cache, "poly1", {"epsilon": 2.0, "epochs": 2}, seeds=(0,), quiet=True, device="cpu", jobs=1)
    run = res["runs"][0]
    assert run["name"] == "poly1[epsilon=2,epochs=2]" and run["metrics"]["all"] is not None
    cfg = configs_for(cache, [("poly1", {"epsilon": 2.0, "batch_size": 32, "epochs": 2, "lr": 0.05}, 3)])[0]
    ref = autograd_reference(cfg, cache)
    got = train_sweep([cfg], data_of(cache), quiet=True)[0].layer
    for key in ("weight", "bias"):
        assert torch.allclose(got[key], ref[key], atol=2e-5, rtol=1e-5), (key, (got[key] - ref[key]).abs().max())
    assert not torch.allclose(got["weight"], cache.weight)


def test_term_targets_and_derived_hooks_match_autograd():
    """Term.targets (label-only per-epoch rows, read as t.aux) and Term.derived (coefficient-only
    quantities in c): two probe terms with 1 and 2 rows next to LADE's 3, on overlapping slices
    of an unsorted batch (the aux rows widened to their span), with padding and an inactive member."""
    def probe_a_loss(z, onehot, valid, c, lb):          # beta sum_i v_i z_{i y_i} / max(N, 1)
        return c["beta"] * ((z * onehot).sum(-1) * valid).sum(1) / valid.sum(1).clamp_min(1)

    def probe_b_loss(z, onehot, valid, c, lb):          # gamma sum_i v_i |z_i|^2 / max(N, 1)
        return c["gamma"] * ((z ** 2).sum(-1) * valid).sum(1) / valid.sum(1).clamp_min(1)

    def per_n(valid):
        return valid / valid.sum(-1, keepdim=True).clamp_min(1)

    def probe_a_grad(z, t, c, lb):
        return torch.zeros_like(z).scatter_(1, t.yi, t.aux * c["beta"])

    def probe_b_grad(z, t, c, lb):
        assert t.aux.shape[1] == 2 and torch.equal(t.aux[:, 1:2], t.valid)
        return z * t.aux[:, 0:1] * c["gamma2"]

    terms = [L.Term("probe_a", {"beta": 0.0}, batch_loss=probe_a_loss, batch_grad=probe_a_grad,
                    targets=lambda y, valid, c, lb: per_n(valid).unsqueeze(-2)),
             L.Term("probe_b", {"gamma": 0.0}, batch_loss=probe_b_loss, batch_grad=probe_b_grad,
                    targets=lambda y, valid, c, lb: torch.stack([per_n(valid), valid], dim=-2),
                    derived=lambda c, lb: {"gamma2": 2 * c["gamma"]})]
    for term in terms:
        L.register_term(term)
    try:
        lade = L.build_loss("lade", {"alpha": 0.1, "lam": 0.01}, COUNTS)
        specs = [L.build_loss("ce", {}, COUNTS), L.LossSpec(K, terms={"probe_a": {"beta": 0.3}}), lade,
                 L.LossSpec(K, terms={"probe_b": {"gamma": 0.2}}), L.build_loss("focal", {"gamma": 1.0}, COUNTS),
                 L.LossSpec(K, terms={"probe_a": {"beta": -0.5}, "probe_b": {"gamma": 0.1}}), lade,
                 L.build_loss("ce", {}, COUNTS)]
        lb = L.stack_specs(specs, COUNTS, "cpu", dtype=torch.float64)
        b = 16
        z, y, valid = padded_batch(len(specs), seed=7, scale=3.0, inactive=3, b=b)
        auto, = torch.autograd.grad(L.batched_loss(z, y, valid, lb).sum(), z)
        targets = L.loss_targets(lb, y.unsqueeze(0), valid.unsqueeze(0))     # an "epoch" of one step
        assert targets.aux.shape == (1, 6, 6, b)                              # members 1..7, rows 3 + 1 + 2
        ours = L.batched_loss_grad(z.detach().transpose(1, 2).contiguous(), None, None, lb,
                                   targets.step(0)).transpose(1, 2)
        assert torch.allclose(ours, auto, atol=1e-10, rtol=1e-8), (ours - auto).abs().amax(dim=(1, 2))
    finally:
        for term in terms:
            L.TERMS.pop(term.name, None)
