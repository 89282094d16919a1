"""The reference slow path: stage 2 as the papers' code runs it, through the frozen backbone.

Every step re-runs the backbone on (augmented) training images with BatchNorm in train mode
(batch statistics; running statistics updated, so the test features drift), trains the head
with the engine's own samplers, losses and optimiser step, then evaluates with the drifted
BN statistics on center + flipped test images. It exists to measure how close cached-feature
re-training comes to the papers' protocol (``ltcache retrain --through-backbone``).
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from ltcache.data import DatasetSpec, build_dataset, hflip
from ltcache.devices import resolve_device
from ltcache.errors import LtcacheError
from ltcache.models import build_model
from ltcache.progress import echo, progress
from ltcache.stage1 import load_checkpoint
from ltcache.stage2.api import evaluate_layer, expand, make_config, parse_seeds
from ltcache.stage2.methods import choose_preset, get_method, run_name
from ltcache.stage2.results import build_results
from ltcache.stage2.sweep import TrainData, train_sweep


@torch.no_grad()
def _features(model, ds, split, device, views=("center", "hflip"), batch_size: int = 500, quiet=True):
    """Eval-mode features [N, V, D] of a split (center and/or flipped images)."""
    sp = ds.splits[split]
    out = []
    for i in progress(range(0, len(sp), batch_size), desc=f"features {split}", quiet=quiet, unit="batch"):
        imgs = sp.images(torch.arange(i, min(i + batch_size, len(sp)))).to(device)
        parts = [model.features(ds.normalize(hflip(imgs) if v == "hflip" else imgs)) for v in views]
        out.append(torch.stack(parts, 1).float())
    return torch.cat(out)


def retrain_through_backbone(ckpt, method: str, overrides: Optional[dict] = None, seeds: Sequence[int] = (0,),
                             augment: bool = True, train_bn: bool = True, test_views: str = "all",
                             device: str = "auto", data_root=None, preset: Optional[str] = None,
                             quiet: bool = False) -> dict:
    """Re-train one method's head through the frozen backbone, one seed at a time (a stacked
    batch would mix the BatchNorm statistics of different configurations). Returns the same
    results JSON as :func:`ltcache.stage2.api.retrain`."""
    m = get_method(method)
    if m.closed_form:
        raise LtcacheError(f"{method} is closed-form (no training); --through-backbone applies to trained methods")
    if test_views not in ("all", "center"):
        raise LtcacheError(f"unknown --test-views '{test_views}'; use all or center")
    dev = resolve_device(device)
    ck = load_checkpoint(ckpt)
    ds = build_dataset(DatasetSpec.from_dict(ck["dataset"]), data_root, quiet=quiet)
    counts = torch.tensor(ds.class_counts, dtype=torch.long)
    pre = choose_preset(ds.num_classes, ck["feature_dim"], preset)
    (meth, params, ov), = expand([m.name], overrides, None, pre, len(ds.splits["train"]))
    name = run_name(meth, params, ov)
    views = ("center", "hflip") if test_views == "all" else ("center",)
    t0 = time.perf_counter()
    runs = []
    stage1 = None
    for seed in parse_seeds(seeds):
        model = _frozen_backbone(ck, dev)
        if stage1 is None:
            model.eval()
            x0 = _features(model, ds, "test", dev, views, quiet=quiet)
            stage1 = evaluate_layer({"kind": "linear", "weight": model.fc.weight.detach(),
                                     "bias": model.fc.bias.detach()}, x0, ds.splits["test"].labels.to(dev), counts.tolist())
        runs.append(_one_seed(model, ds, (meth, params, name, seed), augment, train_bn, dev, views, counts, quiet))
    wall = time.perf_counter() - t0
    groups = ds.groups
    cache_like = SimpleNamespace(path=str(ckpt), manifest={"dataset": ck["dataset"]}, class_counts=ds.class_counts,
                                 class_names=ds.class_names, groups=groups, feature_dim=ck["feature_dim"])
    results = build_results(cache_like, runs, stage1, wall, str(dev))
    results["preset"] = pre
    echo(f"through the backbone: {len(runs)} runs in {wall:.1f} s on {dev}", quiet)
    return results


def _frozen_backbone(ck: dict, dev) -> torch.nn.Module:
    """The stage-1 network on ``dev``, its parameters frozen (BatchNorm statistics may still move).
    On the CPU its weights are channels-last, so every convolution runs in that layout: 1.4x faster
    forwards for the CIFAR ResNet-32 on one core (0.38 -> 0.26 s per 128 images), equal features
    within float32 rounding (1.4e-6)."""
    model = build_model(ck["arch"], ck["num_classes"]).to(dev)
    model.load_state_dict(ck["state_dict"])
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _one_seed(model, ds, run: tuple, augment: bool, train_bn: bool, dev, views, counts: torch.Tensor,
              quiet: bool) -> dict:
    """One seed's head (``run``: method, params, name, seed) trained on features computed batch by
    batch through ``model``, then tested with the (drifted) BatchNorm statistics; its run dict."""
    meth, params, name, seed = run
    train = ds.splits["train"]
    aug_gen = torch.Generator().manual_seed(10_000 + seed)
    model.train(train_bn)

    @torch.no_grad()
    def gather(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        keep = rows[valid.cpu()].cpu()
        imgs = train.images(keep)
        if augment:
            imgs = ds.augment(imgs, aug_gen)
        f = model.features(ds.normalize(imgs.to(dev))).float()
        out = torch.zeros(rows.shape[0], f.shape[1], device=dev)
        out[valid.to(dev)] = f
        return out

    d = model.feature_dim
    data = TrainData(x=torch.zeros(1, 1, d, device=dev).expand(len(train), 1, d), labels=train.labels.to(dev),
                     w0=model.fc.weight.detach().float(), b0=model.fc.bias.detach().float(),
                     gather=gather)
    cfg = make_config(meth, dict(params), seed, name, counts)
    head, = train_sweep([cfg], data, select="last", quiet=quiet)
    model.eval()                       # test with the (drifted) BN running statistics
    x_test = _features(model, ds, "test", dev, views, quiet=quiet)
    metrics = evaluate_layer(head.layer, x_test, ds.splits["test"].labels.to(dev), counts.tolist())
    return {"name": name + "[through-backbone]", "method": meth.name, "params": dict(params), "seed": seed,
            "selected_epoch": head.selected_epoch, "metrics": metrics,
            "protocol": {"through_backbone": True, "augment": augment, "train_bn": train_bn}}
