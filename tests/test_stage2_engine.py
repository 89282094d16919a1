"""The batched stage-2 engine: a mixed sweep equals each configuration trained alone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ltcache.stage2 import api
from ltcache.stage2.methods import METHODS, get_method, resolve_params
from ltcache.stage2.sweep import train_sweep

torch.set_num_threads(1)


def fake_split(n_per_class, d, views, names, gen, centers):
    labels = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(n_per_class)])
    base = centers[labels] + 0.8 * torch.randn(len(labels), d, generator=gen)
    feats = torch.stack([base + 0.1 * torch.randn(len(labels), d, generator=gen) for _ in range(views)], 1)
    return SimpleNamespace(features=feats.float(), labels=labels, index=torch.arange(len(labels)), views=names)


def fake_cache(counts=(150, 60, 30, 12, 6), d=8, train_views=3, seed=0):
    """An in-memory FeatureCache-like object (ARCHITECTURE.md contract) with tiny sizes."""
    g = torch.Generator().manual_seed(seed)
    k = len(counts)
    centers = torch.randn(k, d, generator=g) * 1.5
    train = fake_split(counts, d, train_views, ["clean"] + [f"aug{i}" for i in range(1, train_views)], g, centers)
    val = fake_split([4] * k, d, 2, ["center", "hflip"], g, centers)
    test = fake_split([10] * k, d, 2, ["center", "hflip"], g, centers)
    w = torch.randn(k, d, generator=g) * 0.3 + centers * 0.2
    w[0] *= 2.0
    b = torch.linspace(0.5, -0.5, k)
    return SimpleNamespace(path="mem", manifest={"dataset": {"source": "fake"}},
                           splits={"train": train, "val": val, "test": test}, weight=w, bias=b,
                           class_counts=torch.tensor(counts), class_names=[f"c{j}" for j in range(k)],
                           num_classes=k, feature_dim=d, groups=None)


def draw_views(tr, g):
    """The view of each sample for one epoch, as the engine draws it: from the augmented views
    (the default pool), one generator call when there are several."""
    pool = torch.tensor(api.train_view_pool(tr, clean_view=False))
    n = len(tr.labels)
    return pool[torch.randint(len(pool), (n,), generator=g)] if len(pool) > 1 else pool.expand(n)


def data_of(cache):
    return api._train_data(cache, torch.device("cpu"), "all")


def configs_for(cache, specs):
    counts = cache.class_counts
    out = []
    for name, ov, seed in specs:
        m = get_method(name)
        params = resolve_params(m, "cifar", ov, len(cache.splits["train"].labels))
        out.append(api.make_config(m, params, seed, name, counts))
    return out


def assert_same_heads(a, b) -> None:
    """Two lists of TrainedHead equal bit for bit: configuration, kept epoch, failure, layer."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.config.name, x.config.seed) == (y.config.name, y.config.seed)
        assert x.selected_epoch == y.selected_epoch and x.failed == y.failed
        assert x.layer.keys() == y.layer.keys()
        for key, t in x.layer.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, y.layer[key]), (x.config.method, key)
            else:
                assert t == y.layer[key]


MIXED = [
    ("ce", {"lr": 0.05, "batch_size": 32, "epochs": 3}, 0),
    ("los", {"delta": 0.9, "lr": 0.02, "batch_size": 32, "epochs": 2}, 1),
    ("crt", {"lr": 0.1, "batch_size": 32, "epochs": 3}, 2),          # class-balanced sampler, fresh head
    ("sqrt", {"batch_size": 32, "epochs": 2}, 0),
    ("progressive", {"batch_size": 32, "epochs": 3}, 3),
    ("lws", {"batch_size": 32, "epochs": 2}, 0),
    ("mislas", {"batch_size": 32, "epochs": 3, "shape": "convex"}, 4),
    ("marc", {"batch_size": 32, "epochs": 2}, 0),
    ("maxnorm", {"batch_size": 32, "epochs": 3, "lr": 0.05}, 1),     # BCE-on-softmax + MaxNorm
    ("focal", {"batch_size": 32, "epochs": 2}, 0),
    ("cb", {"batch_size": 32, "epochs": 2}, 0),
    ("cb-focal", {"batch_size": 32, "epochs": 2}, 0),
    ("vs", {"batch_size": 32, "epochs": 2}, 5),
    ("seesaw", {"batch_size": 32, "epochs": 2}, 0),
    ("lade", {"batch_size": 32, "epochs": 2}, 0),
    ("ldam-drw", {"batch_size": 32, "epochs": 2}, 0),                # cosine head group
    ("cosine", {"batch_size": 32, "epochs": 3}, 1),
]


@pytest.mark.parametrize("select", ["last", "val"])
def test_batched_equals_alone(select):
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, MIXED)
    together = train_sweep(cfgs, data, select=select, quiet=True)
    counts = cache.class_counts.tolist()
    test = cache.splits["test"]
    for cfg, t in zip(cfgs, together):
        alone = train_sweep([cfg], data, select=select, quiet=True)[0]
        assert alone.selected_epoch == t.selected_epoch, cfg.method
        for key in ("weight", "bias"):
            if key in t.layer:
                assert torch.allclose(alone.layer[key], t.layer[key], atol=1e-5, rtol=0), (cfg.method, key)
        ma = api.evaluate_layer(alone.layer, test.features, test.labels, counts)
        mt = api.evaluate_layer(t.layer, test.features, test.labels, counts)
        assert ma["all"] == pytest.approx(mt["all"], abs=1e-5)
        assert ma["nll"] == pytest.approx(mt["nll"], abs=1e-5)
        # and it trained: the head moved away from its initial value
        assert not torch.allclose(t.layer.get("weight"), cache.weight) or cfg.head in ("lws", "marc")


def plain_reference(cfg, cache, loss_fn):
    """The same configuration trained by an ordinary PyTorch loop (nn.Linear + torch.optim.SGD)."""
    from ltcache.stage2.samplers import ClassIndex, epoch_indices
    tr = cache.splits["train"]
    n, v, d = tr.features.shape
    g = torch.Generator().manual_seed(cfg.seed)
    lin = torch.nn.Linear(d, cache.num_classes)
    with torch.no_grad():
        lin.weight.copy_(cache.weight)
        lin.bias.copy_(cache.bias)
    opt = torch.optim.SGD(lin.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=0)
    ci = ClassIndex.from_labels(tr.labels, cache.num_classes)
    for e in range(cfg.epochs):
        idx, valid = epoch_indices(cfg.sampler, ci, cfg.batch_size, e, cfg.epochs, g)
        views = draw_views(tr, g)
        for s in range(idx.shape[0]):
            i = idx[s][valid[s]]
            x = tr.features[i, views[i]]
            opt.zero_grad()
            loss_fn(lin(x), tr.labels[i]).backward()
            opt.step()
        sched.step()   # LOS: after each epoch
    return lin.weight.detach(), lin.bias.detach()


@pytest.mark.parametrize("method,ov,loss_fn", [
    ("los", {"delta": 0.98, "lr": 0.05, "wd": 1e-3, "batch_size": 24, "epochs": 3},
     lambda z, y: F.cross_entropy(z, y, label_smoothing=0.98)),
    ("balanced-softmax", {"lr": 0.05, "batch_size": 40, "epochs": 2},
     lambda z, y: F.cross_entropy(z + torch.tensor([150., 60, 30, 12, 6]).log(), y)),
])
def test_engine_equals_plain_pytorch_loop(method, ov, loss_fn):
    cache = fake_cache()
    cfg = configs_for(cache, [(method, ov, 7)])[0]
    if cfg.init == "fresh":
        cfg.init = "stage1"            # the reference copies the stage-1 head
    cfg.schedule, cfg.steps = "cosine", "ceil"     # the loop below is LOS's (per-method recipes: test_stage2_reference)
    w_ref, b_ref = plain_reference(cfg, cache, loss_fn)
    t = train_sweep([cfg], data_of(cache), quiet=True)[0]
    assert torch.allclose(t.layer["weight"], w_ref, atol=1e-5)
    assert torch.allclose(t.layer["bias"], b_ref, atol=1e-5)


def autograd_reference(cfg, cache):
    """One configuration trained by autograd + torch.optim.SGD (parameter groups for the lr
    factors) on the loss definition ``batched_loss``: the check on the engine's hand-written
    head gradients, loss gradients and fused momentum update."""
    from ltcache.stage2 import heads as H
    from ltcache.stage2 import losses as L
    from ltcache.stage2.samplers import ClassIndex, epoch_indices
    from ltcache.stage2.sweep import maxnorm_radius
    tr = cache.splits["train"]
    n, v, d = tr.features.shape
    g = torch.Generator().manual_seed(cfg.seed)
    kind = H.get_head(cfg.head)
    p0, b0 = H.init_head(kind, cfg.init, cache.weight, cache.bias, g, cfg.bias_init)
    p = {a: t.clone().unsqueeze(0).requires_grad_(a in kind.trained) for a, t in p0.items()}
    buf = {a: t.unsqueeze(0) for a, t in b0.items()}
    if kind.family == "cosine":
        buf["scale"] = torch.tensor([float(cfg.scale)])
    factors = {a: (cfg.lr_factor if a in kind.slow else 1.0) for a in kind.trained}
    opt = torch.optim.SGD([{"params": [p[a]], "lr": cfg.lr * f, "weight_decay": 0.0 if a in cfg.no_wd else cfg.wd}
                           for a, f in factors.items()], lr=cfg.lr, momentum=cfg.momentum)
    lb = L.stack_specs([cfg.loss], cache.class_counts, "cpu")
    ci = ClassIndex.from_labels(tr.labels, cache.num_classes)
    for e in range(cfg.epochs):
        for grp, f in zip(opt.param_groups, factors.values()):
            grp["lr"] = cfg.lr_at(e) * f
        idx, valid = epoch_indices(cfg.sampler, ci, cfg.batch_size, e, cfg.epochs, g, steps=cfg.steps)
        views = draw_views(tr, g)
        for s in range(idx.shape[0]):
            i = idx[s][valid[s]]
            z = H.forward(kind.family, p, buf, tr.features[i, views[i]].unsqueeze(0))
            loss = L.batched_loss(z, tr.labels[i].unsqueeze(0), torch.ones(1, len(i)), lb).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if cfg.maxnorm_thresh is not None:
            with torch.no_grad():
                r = maxnorm_radius(cache.weight, cfg.maxnorm_thresh)
                p["W"].mul_((r / p["W"].norm(dim=-1, keepdim=True)).clamp(max=1.0))
    return H.effective(kind.family, {a: t[0].detach() for a, t in p.items()}, {a: t[0] for a, t in buf.items()})


@pytest.mark.parametrize("method,ov", [
    ("crt", {"batch_size": 32, "epochs": 2}), ("progressive", {"batch_size": 32, "epochs": 2}),
    ("lws", {"batch_size": 32, "epochs": 2}), ("mislas", {"batch_size": 32, "epochs": 2}),
    ("marc", {"batch_size": 32, "epochs": 2}), ("cosine", {"batch_size": 32, "epochs": 2}),
    ("ldam-drw", {"batch_size": 32, "epochs": 2}), ("maxnorm", {"batch_size": 32, "epochs": 2, "lr": 0.05}),
    ("focal", {"batch_size": 32, "epochs": 2}), ("cb-focal", {"batch_size": 32, "epochs": 2}),
    ("seesaw", {"batch_size": 32, "epochs": 2}), ("lade", {"batch_size": 32, "epochs": 2}),
    ("vs", {"batch_size": 32, "epochs": 2}), ("los", {"batch_size": 24, "epochs": 2, "lr": 0.05}),
])
def test_engine_equals_autograd_and_torch_sgd(method, ov):
    cache = fake_cache()
    cfg = configs_for(cache, [(method, ov, 3)])[0]
    ref = autograd_reference(cfg, cache)
    got = train_sweep([cfg], data_of(cache), quiet=True)[0].layer
    for key in ("weight", "bias"):
        if key in ref:
            assert torch.allclose(got[key], ref[key], atol=2e-5, rtol=1e-5), (method, key, (got[key] - ref[key]).abs().max())
    assert not torch.allclose(got["weight"], cache.weight)


def test_maxnorm_projection_radius():
    cache = fake_cache()
    cfg = configs_for(cache, [("maxnorm", {"epochs": 2, "lr": 0.5, "wd": 0.0, "maxnorm_thresh": 0.1}, 0)])[0]
    norms0 = cache.weight.norm(dim=1)
    r = float(norms0.min() + 0.1 * (norms0.max() - norms0.min()))
    from ltcache.stage2.sweep import maxnorm_radius
    assert maxnorm_radius(cache.weight, 0.1) == pytest.approx(r)
    t = train_sweep([cfg], data_of(cache), quiet=True)[0]
    assert t.layer["weight"].norm(dim=1).max() <= r + 1e-5


def test_seeds_differ_and_repeat():
    cache = fake_cache()
    cfgs = configs_for(cache, [("crt", {"epochs": 1, "batch_size": 32}, 0), ("crt", {"epochs": 1, "batch_size": 32}, 1),
                               ("crt", {"epochs": 1, "batch_size": 32}, 0)])
    out = train_sweep(cfgs, data_of(cache), quiet=True)
    assert not torch.allclose(out[0].layer["weight"], out[1].layer["weight"])
    assert torch.equal(out[0].layer["weight"], out[2].layer["weight"])


def test_retrain_and_bench_results_schema(tmp_path):
    cache = fake_cache()
    res = api.retrain(cache, "los", {"delta": 0.9, "epochs": 2}, seeds=(0, 1), quiet=True, device="cpu")
    assert res["schema"] == "ltcache-results/1" and len(res["runs"]) == 2
    run = res["runs"][0]
    assert run["name"] == "los[delta=0.9,epochs=2]" and run["selected_epoch"] == 2
    for key in ("all", "many", "medium", "few", "ece", "nll", "per_class_acc", "lm", "rsd", "lm_groups",
                "rsd_groups", "mean_logit", "margin", "weight_norm", "reliability"):
        assert key in run["metrics"]
    assert len(run["metrics"]["reliability"]["bin_count"]) == 15
    res = api.bench(cache, methods=["tau-norm", "posthoc-la", "ncm", "ldam", "lws"], seeds=(0, 1),
                    grid={"epochs": [1, 2]}, overrides=None, quiet=True, device="cpu", out_dir=tmp_path)
    names = [r["name"] for r in res["summary"]]
    assert "ce[epochs=1]" in names and "tau-norm" in names and "ldam[margin=0.5,scale=30,epochs=2]" in names
    assert all(r["n_seeds"] == 2 for r in res["summary"])
    assert [r["all_mean"] for r in res["summary"]] == sorted([r["all_mean"] for r in res["summary"]], reverse=True)
    assert (tmp_path / "results.json").exists() and (tmp_path / "summary.csv").exists()
    assert "(reference)" in (tmp_path / "summary.md").read_text()


def test_every_registered_method_runs():
    cache = fake_cache(d=6)
    assert len(METHODS) >= 22
    res = api.bench(cache, methods=None, seeds=(0,), overrides={"epochs": 1}, quiet=True, device="cpu")
    assert {r["method"] for r in res["runs"]} == set(METHODS)
    for r in res["runs"]:
        assert r["metrics"]["all"] is not None and r["metrics"]["nll"] == r["metrics"]["nll"], r["name"]


@pytest.mark.parametrize("head", ["linear", "lws", "mislas", "marc", "cosine"])
def test_effective_layer_equals_training_forward(head):
    from ltcache.stage2 import heads as H
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    kind = H.get_head(head)
    p, buf = H.init_head(kind, "stage1", w0, b0, g)
    for k in p:
        p[k] = p[k] + 0.1 * torch.randn(p[k].shape, generator=g)
    if kind.family == "cosine":
        buf["scale"] = torch.tensor(16.0)
    x = torch.randn(7, 6, generator=g)
    stacked = {k: v.unsqueeze(0) for k, v in p.items()}
    sbuf = {k: v.reshape(1, *v.shape) for k, v in buf.items()}
    z = H.forward(kind.family, stacked, sbuf, x.unsqueeze(0))[0]
    assert torch.allclose(z, H.apply_layer(H.effective(kind.family, p, buf), x), atol=1e-5)


def test_worker_processes_give_the_same_heads(monkeypatch):
    """Small CPU sweeps fan groups (split in halves to balance) out to forked workers: every
    head must equal the one trained in this process."""
    from ltcache.stage2 import workers
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, MIXED)
    alone = train_sweep(cfgs, data, quiet=True, n_jobs=1)
    monkeypatch.setattr(workers, "MIN_PARALLEL_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # one big group of a CIFAR-10-sized shape and nothing else: split in two halves
        big = configs_for(cache, [("crt", {"batch_size": 128, "epochs": 30}, s) for s in range(60)])
        shape = SimpleNamespace(x=torch.empty(12406, 1, 64), w0=torch.empty(10, 64))
        parts = workers._balance([list(range(60))], big, shape, 2)
        assert len(parts) == 2 and sorted(parts[0] + parts[1]) == list(range(60))
        forked = train_sweep(cfgs, data, quiet=True, n_jobs=2)
    finally:
        torch.set_num_threads(threads)
    for a, f in zip(alone, forked):
        assert a.config is not None and f.config.name == a.config.name
        for key in ("weight", "bias"):
            if key in a.layer:
                assert torch.allclose(a.layer[key], f.layer[key], atol=1e-6, rtol=0), a.config.method


MERGED = [            # one head family per merge key, several batch sizes, epochs and samplers
    ("ce", {"lr": 0.05, "batch_size": 16, "epochs": 3}, 0),
    ("ce", {"lr": 0.05, "batch_size": 32, "epochs": 2}, 0),          # same seed and sampler: own stream
    ("crt", {"lr": 0.1, "batch_size": 48, "epochs": 3}, 2),
    ("mislas", {"batch_size": 24, "epochs": 2, "shape": "convex"}, 4),
    ("maxnorm", {"batch_size": 32, "epochs": 3, "lr": 0.05}, 1),
    ("lade", {"batch_size": 64, "epochs": 1}, 0),
    ("focal", {"batch_size": 32, "epochs": 2}, 0),
    ("focal", {"batch_size": 32, "epochs": 2}, 1),
    ("lws", {"batch_size": 16, "epochs": 2}, 0),                     # frozen base
    ("marc", {"batch_size": 40, "epochs": 3}, 0),
    ("ldam-drw", {"batch_size": 32, "epochs": 2}, 0),                # cosine heads
    ("cosine", {"batch_size": 20, "epochs": 3}, 1),
]


@pytest.mark.parametrize("select", ["last", "val"])
def test_merged_batch_sizes_equal_alone(select):
    """Groups of one head family with different batch sizes (frozen-base or not) merged into one
    step stream (each member's batches padded to the largest, a member with fewer steps idling)
    give every configuration the head it gets trained alone."""
    from ltcache.stage2 import workers
    from ltcache.stage2.grouping import make_groups
    cache = fake_cache()
    data = data_of(cache)
    cfgs = configs_for(cache, MERGED)
    plan = workers.merge_plan(make_groups(cfgs), cfgs, data, "on")
    assert len(make_groups(cfgs)) == 9 and len(plan) == 2           # affine (frozen base too), cosine
    with workers.merging("on"):
        together = train_sweep(cfgs, data, select=select, quiet=True, n_jobs=1)
    for cfg, t in zip(cfgs, together):
        alone = train_sweep([cfg], data, select=select, quiet=True, n_jobs=1)[0]
        assert alone.selected_epoch == t.selected_epoch, cfg.method
        for key in ("weight", "bias", "s", "c"):
            if key in t.layer:
                assert torch.allclose(alone.layer[key], t.layer[key], atol=1e-5, rtol=0), (cfg.method, key)


def test_merge_plan_follows_the_cost_model():
    """``auto`` merges groups of one family where a step's fixed cost outweighs the padded work
    (few members), keeps them apart where the padding would cost more (many members), and
    keeps frozen-base groups apart from the others."""
    from ltcache.stage2 import workers
    from ltcache.stage2.grouping import make_groups
    cache = fake_cache()
    shape = SimpleNamespace(x=torch.empty(12406, 1, 64), w0=torch.empty(10, 64))
    few = configs_for(cache, [("ce", {"batch_size": 64, "epochs": 20}, 0), ("ce", {"batch_size": 128, "epochs": 30}, 0)])
    assert len(workers.merge_plan(make_groups(few), few, shape, "auto")) == 1
    assert len(workers.merge_plan(make_groups(few), few, shape, "off")) == 2
    frozen = few + configs_for(cache, [("lws", {"batch_size": 128, "epochs": 30}, 0)])   # frozen base: apart
    assert sorted(map(len, workers.merge_plan(make_groups(frozen), frozen, shape, "auto"))) == [1, 2]
    many = configs_for(cache, [("ce", {"batch_size": 64, "epochs": 20}, s) for s in range(20)]
                       + [("ce", {"batch_size": 128, "epochs": 30}, s) for s in range(60)])
    assert len(workers.merge_plan(make_groups(many), many, shape, "auto")) == 2
    assert len(workers.merge_plan(make_groups(many), many, shape, "on")) == 1


def test_epochs_draw_the_augmented_views_only_unless_clean_view():
    cache = fake_cache(train_views=3)
    tr = cache.splits["train"]
    assert api.train_view_pool(tr, clean_view=False) == [1, 2]
    assert api.train_view_pool(tr, clean_view=True) == [0, 1, 2]
    # a cache of the clean view alone, or with unnamed views, trains on everything it holds
    assert api.train_view_pool(SimpleNamespace(features=tr.features[:, :1], views=["clean"]), False) == [0]
    assert api.train_view_pool(SimpleNamespace(features=tr.features, views=[]), False) == [0, 1, 2]

    # default: the same heads as a cache that stores only the augmented views
    aug_only = SimpleNamespace(**{**vars(cache), "splits": {**cache.splits, "train": SimpleNamespace(
        features=tr.features[:, 1:].clone(), labels=tr.labels, index=tr.index, views=["aug1", "aug2"])}})
    plans = api.expand(["ce", "ncm"], {"epochs": 2}, None, "cifar", len(tr.labels))
    res, pairs = api.run_sweep(cache, plans, (0,), quiet=True, device="cpu", jobs=1)
    ref, ref_pairs = api.run_sweep(aug_only, plans, (0,), quiet=True, device="cpu", jobs=1)
    assert res["train_views"] == ["aug1", "aug2"]
    ce, ce_ref = pairs[0][1], ref_pairs[0][1]
    assert torch.equal(ce["weight"], ce_ref["weight"]) and torch.equal(ce["bias"], ce_ref["bias"])
    # --clean-view: the clean view joins the draw, so the trained head changes
    with_clean, wc_pairs = api.run_sweep(cache, plans, (0,), quiet=True, device="cpu", jobs=1, clean_view=True)
    assert with_clean["train_views"] == ["clean", "aug1", "aug2"]
    assert not torch.equal(wc_pairs[0][1]["weight"], ce["weight"])
    # nearest class mean: centroids of the clean view, whichever views the epochs draw
    from ltcache.stage2.closed_form import ncm_layer
    expect = ncm_layer(tr.features[:, 0], tr.labels, cache.num_classes)
    for p in (pairs, wc_pairs):
        assert torch.equal(p[1][1]["centroids"], expect["centroids"]) and torch.equal(p[1][1]["mean"], expect["mean"])


def test_members_on_the_same_rows_share_one_gather_and_gemm(monkeypatch):
    """Members with equal sampler, seed, epochs and init draws read identical rows: the engine
    puts them in blocks (one gather, one wider GEMM per block); a block whose rows turn out to
    differ falls back to per-member gathers. Either way every head equals its alone-trained one."""
    from ltcache.stage2 import heads as H
    from ltcache.stage2 import sweep
    cache = fake_cache()
    data = data_of(cache)
    specs = [(m, {"batch_size": 32, "epochs": 2}, s) for s in (0, 1) for m in ("focal", "cb", "crt", "seesaw")]
    specs.append(("ce", {"batch_size": 32, "epochs": 2}, 2))          # another seed: its own stream
    cfgs = configs_for(cache, specs)
    order, n_blocks, r = sweep.stream_blocks(cfgs)
    # focal, cb, seesaw per seed (crt draws a fresh head from its generator first: its own stream)
    assert (n_blocks, r) == (2, 3)
    assert [cfgs[i].seed for i in order[:6]] == [0, 0, 0, 1, 1, 1]
    assert {cfgs[i].method for i in order[6:]} == {"crt", "ce"}
    alone = [train_sweep([c], data, quiet=True, n_jobs=1)[0] for c in cfgs]
    made = []

    class Counted(H.SharedRows):
        def __init__(self, xs, r, rest):
            made.append(xs.shape[0])
            super().__init__(xs, r, rest)

    monkeypatch.setattr(H, "SharedRows", Counted)
    shared = train_sweep(cfgs, data, quiet=True, n_jobs=1)
    assert made and set(made) == {2}          # every step of the group: 2 blocks, one gather each
    made.clear()
    # a wrong block (members of two seeds): the per-epoch check must catch it
    def wrong(group):
        pair = [next(i for i, c in enumerate(group) if c.method == "focal" and c.seed == s) for s in (0, 1)]
        return pair + [i for i in range(len(group)) if i not in pair], 1, 2

    from ltcache.stage2 import grouping
    monkeypatch.setattr(grouping, "stream_blocks", wrong)
    fallback = train_sweep(cfgs, data, quiet=True, n_jobs=1)
    assert not made
    for a, s, f in zip(alone, shared, fallback):
        for key in ("weight", "bias"):
            assert torch.allclose(a.layer[key], s.layer[key], atol=1e-5, rtol=0), a.config.method
            assert torch.allclose(a.layer[key], f.layer[key], atol=1e-5, rtol=0), a.config.method


def test_shared_rows_products_equal_per_member_products():
    from ltcache.stage2 import heads as H
    g = torch.Generator().manual_seed(0)
    s, r, rest, k, b, d = 3, 2, 2, 4, 5, 6
    m = s * r + rest
    xs, xr = torch.randn(s, b, d, generator=g), torch.randn(rest, b, d, generator=g)
    x_full = torch.cat([xs.repeat_interleave(r, 0), xr])
    shared = H.SharedRows(xs, r, xr)
    w, bias = torch.randn(m, k, d, generator=g), torch.randn(m, k, 1, generator=g)
    assert torch.allclose(H._wx(w, shared, bias), torch.baddbmm(bias, w, x_full.transpose(1, 2)), atol=1e-5)
    gz = torch.randn(m, k, b, generator=g)
    into = torch.randn(m, k, d, generator=g)
    expect = 0.9 * into + torch.bmm(gz, x_full)
    assert torch.allclose(H._gx(gz, shared, into.clone(), 0.9), expect, atol=1e-5)
    assert torch.allclose(H._gx(gz, shared), torch.bmm(gz, x_full), atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_shared_rows_products_one_bmm_or_one_mm_per_block(threads):
    """One process thread: the blocks run as one bmm; several: one mm per block. Same numbers."""
    from ltcache.stage2 import heads as H
    g = torch.Generator().manual_seed(1)
    s, r, rest, k, b, d = 3, 2, 1, 4, 5, 6
    m = s * r + rest
    xs, xr = torch.randn(s, b, d, generator=g), torch.randn(rest, b, d, generator=g)
    x_full = torch.cat([xs.repeat_interleave(r, 0), xr])
    w, bias, gz = torch.randn(m, k, d, generator=g), torch.randn(m, k, 1, generator=g), torch.randn(m, k, b, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert len(H._block_parts(H.SharedRows(xs, r, xr), xs)) == (1 if threads == 1 else s)
        z = H._wx(w, H.SharedRows(xs, r, xr), bias)
        dw = H._gx(gz, H.SharedRows(xs, r, xr), torch.ones(m, k, d), 0.5)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(z, torch.baddbmm(bias, w, x_full.transpose(1, 2)), atol=1e-5)
    assert torch.allclose(dw, 0.5 + torch.bmm(gz, x_full), atol=1e-5)
