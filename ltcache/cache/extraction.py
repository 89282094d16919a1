"""Extraction: one pass of the frozen backbone over every split into HDF5 shards.

Views: val/test hold ``center`` and ``hflip`` (test-time flip averaging without re-running the
backbone); train holds the ``clean`` view (eval-mode BN) plus ``--train-views`` augmented views.
Augmented train views can use BatchNorm batch statistics (``--train-bn batch``), and the BN
running statistics can be shifted on augmented training batches before val/test are extracted
(``--bn-shift instance|class``): what the papers' stage 2 does by re-running the backbone in
train mode (docs/ARCHITECTURE.md, "Cache"). Every random choice is seeded per (split, shard), so a resumed
extraction writes exactly the shards an uninterrupted one would.

Under torchrun (``WORLD_SIZE`` > 1) rank r extracts the contiguous rows [r*n/W, (r+1)*n/W) of every
split's storage order into its own shards, numbered after those of the ranks before it, so the
manifest (written by rank 0 once every rank is done) lists the rows in one process's order.
Eval-mode views (clean, center, hflip) equal one process's row for row; every rank runs the same
seeded BN shift, so val/test do too. Augmented train views of in-memory splits are seeded per
shard, and batch-statistics views depend on the shards' batches: they depend on the number of
processes,
which the manifest records (``extraction.world_size``); an unfinished extraction resumes only with
the number of processes that started it.

Streamed (large-image) splits are decoded batch by batch by the dataset's loader; their
augmentation is seeded per row (seed, split, row), whatever the number of processes.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ltcache import distributed, interrupts
from ltcache.cache import feature_sets
from ltcache.cache.build import DTYPES, CacheWriter, RankWriter, manifest_body
from ltcache.cache.manifest import sha256_file
from ltcache.cache.shards import shard_name
from ltcache.checkpoints import read_torch_file
from ltcache.data import DatasetSpec, build_dataset, hflip
from ltcache.devices import resolve_device
from ltcache.errors import LtcacheError
from ltcache.models import build_model, load_foreign_state_dict
from ltcache.models.layouts import resolve as resolve_layout
from ltcache.models.registry import check_arch, load_pretrained
from ltcache.options import BN_SHIFTS, TRAIN_BN
from ltcache.progress import echo, progress

SPLITS = ("train", "val", "test")
TEST_VIEWS = ("center", "hflip")
BN_STATS = "bn_stats.pt"
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SKIPPED_LISTED = 5          # undecodable images named in the manifest (all are counted)


def _seed(seed: int, *parts) -> int:
    return (seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2 ** 63)


def train_row_order(n: int, seed: int) -> torch.Tensor:
    """Storage order of the train rows of a batch-statistics cache: a seeded permutation (each row's
    source position is kept in the shards' ``index``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, "train", "row-order")))


def _read_file(ckpt: Path, flag: str = "--ckpt"):
    try:
        if flag == "--pretrained":
            return read_torch_file(ckpt, "fix --pretrained (a local weights file, e.g. saved with "
                                   "torch.save(model.state_dict(), PATH))", "save the weights again or fix --pretrained")
        return read_torch_file(ckpt, "train one with `ltcache train` or fix --ckpt", "re-train or fix --ckpt")
    except LtcacheError as exc:
        if "(ModuleNotFoundError)" in str(exc) or "(AttributeError)" in str(exc):
            raise LtcacheError(f"{ckpt} holds a pickled model object (torch.save(model), as LOS's main_stage1.py "
                               "writes) whose class cannot be imported here; re-save it with "
                               "torch.save(model.state_dict(), FILE) where it was trained") from None
        raise


def read_backbone(ckpt: Path, arch: Optional[str], dataset_args: dict, source: Optional[str] = None,
                  pretrained: bool = False) -> tuple[dict, dict, str, Optional[dict]]:
    """(state_dict, dataset spec dict, arch, layout) from an ltcache checkpoint or a foreign one.

    A foreign checkpoint is read in the layout ``source`` (``--from``: los, mislas, crt, ldam-drw,
    bot, torchvision; None: the one that fits, :mod:`ltcache.models.layouts`); its state dict comes
    back in ``build_model(arch, K)``'s key names with the source's classifier as ``fc``, and
    ``layout`` says what was read (None for an ltcache checkpoint). ``pretrained``: local backbone
    weights (``--pretrained``), returned as they are (their head may be absent or of other classes)."""
    obj = _read_file(ckpt, "--pretrained" if pretrained else "--ckpt")
    if isinstance(obj, dict) and obj.get("format") == "ltcache-stage1":
        if arch and arch != obj["arch"]:
            raise LtcacheError(f"--arch {arch} contradicts the checkpoint's arch {obj['arch']}; drop --arch")
        if source is not None:
            raise LtcacheError(f"{ckpt} is an ltcache checkpoint; drop --from {source}")
        return obj["state_dict"], dict(obj["dataset"]), obj["arch"], None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) or isinstance(v, dict) for v in obj.values()):
        raise LtcacheError(f"{ckpt} holds neither an ltcache checkpoint nor a state dict")
    if not arch or not dataset_args.get("dataset"):
        raise LtcacheError(f"{ckpt} is a foreign checkpoint: give --arch NAME and the dataset flags "
                           "(--dataset, --imb-ratio, ...) it was trained with (and --from LAYOUT if not detected)")
    if pretrained:
        for key in ("state_dict", "model", "state_dict_model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not all(torch.is_tensor(v) for v in obj.values()):
            raise LtcacheError(f"{ckpt} holds neither an ltcache checkpoint nor a state dict")
    else:
        reading = resolve_layout(obj, arch, source, ckpt, build_model(arch, 1))
    spec = DatasetSpec(dataset_args["dataset"], imb_ratio=dataset_args.get("imb_ratio", 100.0),
                       profile=dataset_args.get("profile", "exp"), selection=dataset_args.get("selection", "shuffle"),
                       seed=dataset_args.get("seed", 0), val_per_class=dataset_args.get("val_per_class"))
    if pretrained:
        return obj, spec.to_dict(), arch, None
    layout = reading.manifest()
    if reading.pool_input:
        layout["pool_input"] = reading.pool_input
    return reading.state_dict, spec.to_dict(), arch, layout


def default_cache_dir(ckpt: Path) -> Path:
    """``runs/NAME/cache`` for ``runs/NAME/stage1/stage1.pt`` (``ltcache.runs``)."""
    from ltcache.runs import default_cache_dir as by_convention
    return by_convention(ckpt)


class _FrozenBN:
    """BatchNorm in train mode (batch statistics) without touching the running statistics: the
    momentum is 0 during the forward and every BN buffer (running mean/var, num_batches_tracked)
    is restored afterwards, so the state is bit-identical however many batches went through."""

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.momentum, [b.clone() for b in m.buffers()]) for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
            m.train()
        return self

    def __exit__(self, *exc):
        for m, (mom, bufs) in zip(self.bns, self.saved):
            m.momentum = mom
            for b, old in zip(m.buffers(), bufs):
                b.copy_(old)
            m.eval()
        return False


def shard_bounds(n: int, shard_rows: int, min_last: int = 1) -> list:
    """Row ranges of the shards of an n-row split: ``shard_rows`` each, the last one folded into
    its predecessor when shorter than ``min_last`` (so batch-statistics views never come from a
    handful of images)."""
    starts = list(range(0, n, shard_rows)) or [0]
    bounds = [(s, min(n, s + shard_rows)) for s in starts]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def rank_shards(n: int, shard_rows: int, min_last: int = 1, world: int = 1) -> list:
    """For each rank: its shards as (global shard index, lo, hi) over the storage order. The shards
    are those of one process (:func:`shard_bounds`), whole shards handed to the ranks in contiguous
    runs, so a shard -- its rows, its BN batches, its seed -- is the same for every number of
    processes, and a cache is too; an empty split has one empty shard (rank 0's)."""
    bounds = shard_bounds(n, shard_rows, min_last)
    s = len(bounds)
    return [[(i, *bounds[i]) for i in range(r * s // world, (r + 1) * s // world)] for r in range(world)]


def row_seeds(seed: int, split: str, rows: torch.Tensor) -> torch.Tensor:
    """Augmentation seed of each row of a streamed split: from (seed, split, row), so it does not
    depend on shards or on the number of processes."""
    return torch.tensor([_seed(seed, split, "row", int(r)) for r in rows.tolist()], dtype=torch.long)


def batches(order: torch.Tensor, batch_size: int) -> tuple:
    """Split a shard's row order into ceil(m / batch_size) near-equal batches (none tiny)."""
    m = len(order)
    return torch.tensor_split(order, max(1, -(-m // batch_size))) if m else ()


class _Extractor:
    """Forwards batches of uint8 images through the frozen backbone on the device."""

    def __init__(self, model, ds, device, amp, batch_size, workers: int = 8, skip_bad: bool = False,
                 seed: int = 0):
        self.model, self.ds, self.device, self.amp, self.bs = model, ds, device, amp, batch_size
        self.workers, self.skip_bad, self.seed = workers, skip_bad, seed
        self.images_done = 0
        self.skipped: list = []                 # streamed images that could not be decoded (--skip-bad-images)
        self.n_skipped = 0

    def to_device(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """One host-to-device copy of a uint8 batch (page-locked first on CUDA, asynchronous)."""
        if self.device.type == "cuda":
            return x_uint8.pin_memory().to(self.device, non_blocking=True)
        return x_uint8.to(self.device)

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Features (float32, on the device) of a uint8 batch already on the device."""
        x = self.ds.normalize(x_uint8)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.amp):
            f = self.model.features(x)
        self.images_done += x.shape[0]
        return f.float()

    def views(self, split: str, rows: torch.Tensor, names: Sequence[str], train_bn: str,
              gen: torch.Generator, dtype: str, bar=None) -> tuple:
        """Features [m', V, D] in the storage dtype, on the host, of the given rows for every
        named view, and the positions in ``rows`` they belong to (None: every row; a streamed split
        with ``skip_bad`` leaves out the images that cannot be decoded). The views are made on the
        device from one uploaded batch, cast there, and come back in one device-to-host copy per
        batch (``bar`` advances by each batch's images)."""
        sp = self.ds.splits[split]
        m = len(rows)
        out = None
        self._top = torch.zeros((), device=self.device)     # largest |feature| (range check, one sync per shard)
        self._bad = torch.zeros((), dtype=torch.long, device=self.device)    # non-finite count
        # batch-statistics views: batches formed by a seeded permutation of the shard's rows
        batch_stats = split == "train" and train_bn == "batch"
        order = torch.randperm(m, generator=gen) if batch_stats else torch.arange(m)
        keep = None
        if getattr(sp, "streamed", False):
            out, keep = self._streamed(split, rows, order, names, batch_stats, dtype, bar)
        else:
            for pos in batches(order, self.bs):
                imgs = self.to_device(sp.images(rows[pos]))
                parts = []
                for v in names:
                    if v in ("clean", "center"):
                        parts.append(self.forward(imgs))
                    elif v == "hflip":
                        parts.append(self.forward(hflip(imgs)))
                    else:                                          # augmented training view
                        aug = self.ds.augment(imgs, gen)
                        parts.append(self._forward_aug(aug, batch_stats))
                out = self._collect(out, m, pos, parts, dtype, bar)
        _check_finite(int(self._bad), float(self._top), dtype, split)
        if out is None:                                        # an empty split (e.g. --val-per-class 0)
            out = torch.empty((0, len(names), self.model.feature_dim), dtype=TORCH_DTYPES[dtype])
        return out, keep

    def _forward_aug(self, aug: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        if batch_stats:
            with _FrozenBN(self.model):
                return self.forward(aug)
        return self.forward(aug)

    def _collect(self, out, m: int, pos: torch.Tensor, parts: list, dtype: str, bar):
        """Check and cast one batch's views, copy them to the host rows ``pos`` of ``out``."""
        feats = torch.stack(parts, 1)
        finite = torch.isfinite(feats)
        self._bad += (~finite).sum()
        self._top = torch.maximum(self._top, torch.where(finite, feats.abs(), 0.0).amax())
        host = feats.to(TORCH_DTYPES[dtype]).cpu()            # the one D2H copy of this batch
        if out is None:
            out = torch.empty((m,) + tuple(host.shape[1:]), dtype=host.dtype)
        out[pos] = host
        if bar is not None:
            bar.update(len(pos))
        return out

    def _streamed(self, split: str, rows: torch.Tensor, order: torch.Tensor, names: Sequence[str],
                  batch_stats: bool, dtype: str, bar) -> tuple:
        """The views of a streamed split, decoded batch by batch by the dataset's loader (in the
        order ``order``: the batches of batch-statistics views); returns (features, kept positions)."""
        m = len(rows)
        asked = ["center" if v == "clean" else (v if v in TEST_VIEWS else "train") for v in names]
        seeds = row_seeds(self.seed, split, rows[order])
        out, seen = None, torch.zeros(m, dtype=torch.bool)
        for b in self.ds.loader(split, rows[order], self.bs, asked, seeds, self.workers, self.skip_bad,
                                  pin_memory=self.device.type == "cuda"):
            self._note_skipped(b.skipped)
            pos = order[torch.as_tensor(b.pos, dtype=torch.long)]
            if len(pos) == 0:
                continue
            imgs = self.to_device(b.images)
            parts = [self._forward_aug(imgs[:, j], batch_stats) if a == "train" else self.forward(imgs[:, j])
                     for j, a in enumerate(asked)]
            out = self._collect(out, m, pos, parts, dtype, None)
            seen[pos] = True
            if bar is not None:
                bar.update(len(pos))
        if bar is not None and int(seen.sum()) < m:
            bar.update(m - int(seen.sum()))
        if bool(seen.all()):
            return out, None
        keep = torch.nonzero(seen).flatten()
        return (out[keep] if out is not None else None), keep

    def _note_skipped(self, skipped) -> None:
        if isinstance(skipped, int):
            self.n_skipped += skipped
            return
        items = list(skipped or [])
        self.n_skipped += len(items)
        self.skipped.extend(str(x) for x in items[:max(0, SKIPPED_LISTED - len(self.skipped))])


def bare_inference_rate(model, ds, device, amp, batch_size: int, repeats: int = 3) -> float:
    """Images/s of the backbone alone: forwards of a fixed batch already on the device (no data,
    no copies, no I/O) -- the ceiling extraction is measured against."""
    x = torch.randint(0, 255, (batch_size, 3, ds.image_size, ds.image_size), dtype=torch.uint8)
    x = ds.normalize(x.to(device))
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.autocast(device.type, enabled=amp):
            model.features(x)

    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * batch_size / (time.perf_counter() - t)


@torch.no_grad()
def shift_bn(model: nn.Module, ds, device, amp, mode: str, passes: int, batch_size: int, seed: int,
             quiet: bool, workers: int = 8, skip_bad: bool = False) -> None:
    """Move only the BN running statistics: train-mode forwards (no gradients) over augmented
    training batches drawn instance- or class-balanced (MiSLAS "shift learning on BN").
    Deterministic for a seed: every torchrun rank shifts its own copy to the same statistics."""
    sp = ds.splits["train"]
    n, k = len(sp), ds.num_classes
    g = torch.Generator().manual_seed(_seed(seed, "bn-shift"))
    by_class = [torch.nonzero(sp.labels == c).flatten() for c in range(k)]
    bs = min(batch_size, n)
    per_pass = max(1, n // bs)              # full batches only: a short last batch would skew the statistics
    ex = _Extractor(model, ds, device, amp, bs)
    model.train()
    if getattr(sp, "streamed", False):
        try:
            _shift_streamed(ex, sp, g, by_class, mode, passes, per_pass, bs, seed, quiet, workers, skip_bad)
        finally:
            model.eval()
        return
    try:
        for s in progress(range(passes * per_pass), desc=f"bn-shift ({mode})", quiet=quiet, unit="batch"):
            if mode == "instance":
                if s % per_pass == 0:
                    perm = torch.randperm(n, generator=g)
                j = s % per_pass
                idx = perm[j * bs:(j + 1) * bs]
            else:                            # class-balanced: a uniform class, then a uniform image of it
                cls = torch.randint(k, (bs,), generator=g)
                pick = torch.randint(1 << 30, (bs,), generator=g)
                idx = torch.stack([by_class[c][p % len(by_class[c])] for c, p in zip(cls.tolist(), pick.tolist())])
            if len(idx) > 1:
                ex.forward(ds.augment(ex.to_device(sp.images(idx)), g))
    finally:
        model.eval()


def _shift_streamed(ex, sp, g, by_class, mode, passes, per_pass, bs, seed, quiet, workers, skip_bad) -> None:
    """:func:`shift_bn` on a streamed train split: each pass's rows are drawn first, then decoded
    and augmented batch by batch by the loader (seeded per draw)."""
    n, k = len(sp), len(by_class)
    for p in progress(range(passes), desc=f"bn-shift ({'instance' if mode == 'instance' else 'class'})",
                      quiet=quiet, unit="pass"):
        if mode == "instance":
            idx = torch.randperm(n, generator=g)[:per_pass * bs]
        else:
            cls = torch.randint(k, (per_pass * bs,), generator=g)
            pick = torch.randint(1 << 30, (per_pass * bs,), generator=g)
            idx = torch.stack([by_class[c][q % len(by_class[c])] for c, q in zip(cls.tolist(), pick.tolist())])
        seeds = torch.tensor([_seed(seed, "bn-shift", p, j) for j in range(len(idx))], dtype=torch.long)
        for b in ex.ds.loader("train", idx, bs, ["train"], seeds, workers, skip_bad,
                                  pin_memory=ex.device.type == "cuda"):
            if b.images.shape[0] > 1:
                ex.forward(ex.to_device(b.images[:, 0]))


def _check_finite(n_bad: int, top: float, dtype: str, split: str) -> None:
    """Refuse to write features that would load as NaN/inf (the cache would be unusable)."""
    if n_bad:
        raise LtcacheError(f"the backbone produced non-finite features (NaN/inf) on the {split} split: "
                           "the checkpoint is broken or diverged; check it (e.g. its val accuracy) before extracting")
    if top > float(np.finfo(DTYPES[dtype]).max):
        raise LtcacheError(f"features of the {split} split reach {top:.3g}, beyond the {dtype} range: re-run with "
                           "--dtype float32 (and --force to discard the shards written so far)")


def _check(name, value, allowed):
    if value not in allowed:
        raise LtcacheError(f"--{name} must be one of {', '.join(allowed)} (got '{value}')")


# What ``protocol`` sets when the options themselves are not given. ``faithful`` is the protocol
# measured closest to the papers' stage 2 through the backbone (README, "Cached features vs the
# papers' image pipeline": LOS -0.14, CE +0.28 points): 4 augmented views with BatchNorm batch
# statistics over batches of 64 (the LOS protocol's batch), BN running statistics shifted on
# instance-balanced augmented batches before val/test. ``clean`` is the fast eval-mode cache.
PROTOCOLS = {"faithful": {"train_views": 4, "train_bn": "batch", "bn_shift": "instance", "batch_size": 64},
             "clean": {"train_views": 0, "train_bn": "running", "bn_shift": "none", "batch_size": 256}}


def extract(ckpt=None, cache=None, splits: Sequence[str] = SPLITS, test_views: Sequence[str] = TEST_VIEWS,
            train_views: Optional[int] = None, train_bn: Optional[str] = None, bn_shift: Optional[str] = None,
            bn_shift_passes: int = 1, dtype: str = "float16", shard_rows: int = 8192,
            batch_size: Optional[int] = None, device: str = "auto",
            data_root=None, arch: Optional[str] = None, dataset: Optional[str] = None, imb_ratio: float = 100.0,
            profile: str = "exp", selection: str = "shuffle", val_per_class: Optional[int] = None, seed: int = 0,
            force: bool = False, quiet: bool = False, workers: int = 8, protocol: str = "faithful",
            pretrained=None, source: Optional[str] = None, skip_bad: bool = False,
            feature_set: Optional[str] = None) -> Path:
    """Extract the penultimate features of every split into a cache directory; returns it.

    ``protocol`` (:data:`PROTOCOLS`) fills train_views, train_bn, bn_shift and batch_size where
    they are not given: ``faithful`` (the default) or ``clean``. ``pretrained`` (instead of
    ``ckpt``): local backbone weights for ``arch`` (e.g. ``torchvision:resnet18``); their classifier
    is the stage-1 classifier when it has the dataset's classes, else the cache records none.
    ``skip_bad``: images of a streamed split that cannot be decoded are left out (counted in the
    manifest) instead of stopping the extraction. ``feature_set``: write the cache's feature set of
    that name (:mod:`ltcache.cache.feature_sets`: ``CACHE/sets/NAME``, its BN options fixed) instead
    of its main features.

    Under torchrun every rank calls this with the same arguments (checked before any work); each
    extracts its share of the rows and rank 0 writes the manifest (module docstring)."""
    if feature_set is not None:
        train_bn, bn_shift, batch_size, cache = _feature_set(feature_set, train_bn, bn_shift, batch_size, cache,
                                                             ckpt or pretrained)
    distributed.init_from_env(device)            # torchrun: join the other ranks (idempotent)
    world, rank = (distributed.world(), distributed.rank()) if distributed.active() else (1, 0)
    distributed.check_same({k: str(v) for k, v in locals().items() if k not in (
        "quiet", "workers", "data_root", "world", "rank")}, "extraction (its options)")
    quiet = quiet or rank > 0                    # rank 0 prints for everyone
    args = _options(ckpt, pretrained, protocol, splits, test_views, train_views, train_bn, bn_shift, bn_shift_passes,
                    dtype, shard_rows, batch_size, seed, arch, dataset, source)
    ckpt = Path(ckpt if ckpt is not None else pretrained)
    if arch:
        check_arch(arch)                       # before reading the checkpoint or the dataset
    sd, spec_dict, arch, ck_layout = read_backbone(
        ckpt, arch, {"dataset": dataset, "imb_ratio": imb_ratio, "profile": profile, "selection": selection,
                     "seed": seed, "val_per_class": val_per_class}, source=source, pretrained=pretrained is not None)
    ck_sha = sha256_file(ckpt)
    cache_dir = Path(cache) if cache else default_cache_dir(ckpt)
    key = {"checkpoint_sha256": ck_sha, "arch": arch, "dtype": dtype, "shard_rows": shard_rows, "dataset": {
        k: spec_dict.get(k) for k in ("source", "imb_ratio", "profile", "selection", "seed", "val_per_class")}, **args}
    if ck_layout is not None:
        key["checkpoint_layout"] = ck_layout["from"]
    distributed.check_same([key, str(cache_dir)], "extraction (checkpoint, options and cache folder)")
    writer, complete = _open_writer(cache_dir, key, force, world, rank)
    if complete:
        if writer is not None:
            writer.abort()
        echo(f"{cache_dir} is already complete for this checkpoint and these options", quiet)
        return cache_dir
    try:
        with interrupts.keeps("the completed shards are kept; the same command resumes from them"), \
                distributed.watch("the extraction", fix="re-run the same command to resume from the completed shards"):
            path = _extract(writer, sd, spec_dict, arch, ckpt, ck_sha, args, dtype, shard_rows, device,
                            data_root, quiet, workers, ck_layout, world=world, rank=rank, skip_bad=skip_bad)
    except BaseException:
        writer.abort()      # completed shards stay; the next run resumes from them
        raise
    return path if path is not None else cache_dir


def _feature_set(name: str, train_bn, bn_shift, batch_size, cache, ckpt) -> tuple:
    """(train_bn, bn_shift, batch_size, folder) of the cache's feature set ``name``: its fixed options
    (a contradicting option refused) and ``CACHE/sets/NAME`` (CACHE: given, or the checkpoint's default)."""
    opts = feature_sets.extraction_options(name, {"train_bn": train_bn, "bn_shift": bn_shift,
                                                  "batch_size": batch_size})
    if cache is None and ckpt is not None:
        cache = default_cache_dir(Path(ckpt))
    return (opts["train_bn"], opts["bn_shift"], opts["batch_size"],
            feature_sets.set_dir(cache, name) if cache is not None else None)


def _options(ckpt, pretrained, protocol: str, splits, test_views, train_views, train_bn, bn_shift,
             bn_shift_passes: int, dtype: str, shard_rows: int, batch_size, seed: int, arch, dataset, source) -> dict:
    """The extraction's options (the protocol filling what is not given), checked before any work:
    the ``args`` recorded in the manifest and the cache key."""
    if (ckpt is None) == (pretrained is None):
        raise LtcacheError("give --ckpt (a stage-1 checkpoint or a state dict) or --pretrained (local backbone "
                           "weights, with --arch and --dataset), one of them")
    _check("protocol", protocol, tuple(PROTOCOLS))
    chosen = PROTOCOLS[protocol]
    train_views = chosen["train_views"] if train_views is None else train_views
    train_bn = chosen["train_bn"] if train_bn is None else train_bn
    bn_shift = chosen["bn_shift"] if bn_shift is None else bn_shift
    batch_size = chosen["batch_size"] if batch_size is None else batch_size
    splits, test_views = list(splits), list(test_views)
    for s in splits:
        _check("splits", s, SPLITS)
    for v in test_views:
        _check("test-views", v, TEST_VIEWS)
    if not splits or not test_views:
        raise LtcacheError("--splits and --test-views need at least one name")
    _check("train-bn", train_bn, TRAIN_BN)
    _check("bn-shift", bn_shift, BN_SHIFTS)
    _check("dtype", dtype, tuple(DTYPES))
    if train_views < 0 or shard_rows < 1 or batch_size < 2 or bn_shift_passes < 1:
        raise LtcacheError("--train-views must be >= 0, --shard-rows >= 1, --batch-size >= 2, --bn-shift-passes >= 1")
    if pretrained is not None and not (arch and dataset):
        raise LtcacheError("--pretrained needs --arch NAME (e.g. torchvision:resnet18) and --dataset (with "
                           "--imb-ratio, ... as for `ltcache train`)")
    if pretrained is not None and source is not None:
        raise LtcacheError(f"--from {source} reads a --ckpt checkpoint; drop it with --pretrained")
    args = {"splits": splits, "test_views": test_views, "train_views": train_views, "train_bn": train_bn,
            "bn_shift": bn_shift, "bn_shift_passes": bn_shift_passes, "batch_size": batch_size, "seed": seed,
            "train_row_order": "shuffled" if (train_bn == "batch" and train_views > 0) else "source"}
    if pretrained is not None:
        args["weights"] = "pretrained"
    return args


def _open_writer(cache_dir: Path, key: dict, force: bool, world: int, rank: int) -> tuple:
    """(writer, complete). One process: a :class:`CacheWriter`. Several: rank 0 alone opens the
    cache (lock, folder, resume check) and tells the others where to write; every other rank opens
    a :class:`RankWriter` there (None when the cache is already complete). A refusal on any rank
    ends every rank with one line."""
    if world == 1:
        writer = CacheWriter(cache_dir, key, force=force)
        return writer, writer.complete
    held = {}

    def open_cache():
        held["w"] = CacheWriter(cache_dir, key, force=force, world=world)
        return str(held["w"].dir), held["w"].complete

    folder, complete = distributed.on_main(open_cache, "opening the cache", undo=lambda: held["w"].abort())
    writer, err = held.get("w"), None
    if rank > 0 and not complete:
        try:
            writer = RankWriter(folder, key, world, rank)
        except LtcacheError as exc:
            err = str(exc)
    try:
        bad = [(r, e) for r, e in enumerate(distributed.all_gather_objects(err, "opening the cache")) if e]
    except BaseException:                   # a rank lost: the lock and the opened writer go with this one
        if writer is not None:
            writer.abort()
        raise
    if bad:
        if writer is not None:
            writer.abort()
        raise LtcacheError(err or f"rank {bad[0][0]} could not open the cache: {bad[0][1]}")
    return writer, complete


@dataclass
class _Job:
    """One extraction's state, shared by its steps (model, splits, BN shift, manifest)."""
    writer: object
    args: dict
    ds: object
    model: nn.Module
    ex: object
    dev: torch.device
    amp: bool
    quiet: bool
    workers: int
    skip_bad: bool
    world: int
    rank: int
    layout: dict = field(default_factory=dict)
    seconds: float = 0.0
    shift_s: float = 0.0
    shifted: bool = False


def _extract(writer, sd, spec_dict, arch, ckpt, ck_sha, args, dtype, shard_rows, device, data_root, quiet, workers,
             ck_layout=None, world: int = 1, rank: int = 0, skip_bad: bool = False) -> Optional[Path]:
    """The extraction itself: the backbone, every split's shards (this rank's share, resuming from
    the shards kept), the BN shift, then the manifest (rank 0). None on the ranks that do not write it."""
    dev = resolve_device(device)
    amp = dev.type == "cuda"
    spec = DatasetSpec.from_dict(spec_dict)
    ds = build_dataset(spec, data_root, quiet=quiet, workers=workers)
    model, head_kept = _backbone(ds, arch, sd, ckpt, ck_layout, args, dev)
    bs = args["batch_size"]
    counts = ", ".join(f"{s} {len(ds.splits[s]):,}" for s in SPLITS if s in args["splits"] and s in ds.splits)
    echo(f"extract: {spec.source} ({ds.num_classes} classes; {counts} images) through {arch} from {ckpt}\n"
         f"  train views clean + {args['train_views']} augmented ({args['train_bn']} BN), BN shift {args['bn_shift']}, "
         f"test views {'+'.join(args['test_views'])}, batch {bs}, {dtype}\n"
         f"  device {dev}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}, {workers} workers"
         f"{f', {world} ranks' if world > 1 else ''} -> {getattr(writer, 'final', writer.dir)}", quiet)
    # the ceiling, measured at the batch extraction will run (no larger than the data: a small
    # extraction is not made to forward several times its own images just to measure it)
    biggest = max((len(ds.splits[s]) for s in args["splits"] if s in ds.splits), default=bs)
    bare = bare_inference_rate(model, ds, dev, amp, max(2, min(bs, biggest)))
    ex = _Extractor(model, ds, dev, amp, bs, workers=workers, skip_bad=skip_bad, seed=args["seed"])
    job = _Job(writer, args, ds, model, ex, dev, amp, quiet, workers, skip_bad, world, rank)
    began = time.time()
    _extract_splits(job, dtype, shard_rows)
    rate = ex.images_done / max(job.seconds, 1e-9)
    mine = {"rank": rank, "images_forwarded": ex.images_done, "seconds": round(job.seconds, 2),
            "images_per_s": round(rate, 1), "span": [round(began, 3), round(time.time(), 3)],
            "skipped": ex.n_skipped, "skipped_first": ex.skipped}
    more, ranks, seconds = None, [mine], job.seconds
    if world > 1:
        gathered = _gather_ranks(writer, mine, rank)
        if gathered is None:
            return None
        more, ranks = gathered
        images = sum(st["images_forwarded"] for st in ranks)
        seconds = max(st["seconds"] for st in ranks)
        rate = images / max(seconds, 1e-9)
    extraction = _extraction_record(job, ranks, more, seconds, rate, bare)
    body = _manifest(job, spec_dict, arch, ckpt, ck_sha, ck_layout, dtype, extraction, head_kept)
    path = _finish(job, body, more, head_kept)
    echo(f"extracted {extraction['images_forwarded']} images (rows x views) in {seconds:.1f}s"
         + (f" on {world} processes" if world > 1 else "") + f": {rate:.0f} img/s; bare backbone "
         f"inference in the same run: {bare:.0f} img/s ({100 * rate / max(bare, 1e-9):.0f}%)"
         + (f"; BN shift {job.shift_s:.1f}s" if job.shift_s else "") + f" -> {path}", quiet)
    return path


def _backbone(ds, arch: str, sd: dict, ckpt: Path, ck_layout: Optional[dict], args: dict, dev) -> tuple:
    """(the frozen network in eval mode on ``dev``, whether the weights' classifier was kept)."""
    if ck_layout and ck_layout.get("pool_input") and ds.image_size != ck_layout["pool_input"]:
        raise LtcacheError(f"{ckpt}: the {ck_layout['from']} network pools with a fixed AvgPool2d window, which equals "
                           f"ltcache's global average pooling only on {ck_layout['pool_input']}x{ck_layout['pool_input']} "
                           f"images (this dataset has {ds.image_size}); extract it on such a dataset")
    model = build_model(arch, ds.num_classes)
    if args.get("weights") == "pretrained":
        head_kept = load_pretrained(model, sd)
    else:
        load_foreign_state_dict(model, sd, str(ckpt))
        head_kept = True
    model = model.to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, head_kept


def _batch_stats(split: str, args: dict) -> bool:
    """Whether a split's views are forwarded with batch statistics (augmented train views in train BN)."""
    return split == "train" and args["train_bn"] == "batch" and args["train_views"] > 0


def _shift(job: _Job) -> None:
    """The BN shift (once, before the first split that is not train, or at the end)."""
    a = job.args
    t = time.perf_counter()
    shift_bn(job.model, job.ds, job.dev, job.amp, a["bn_shift"], a["bn_shift_passes"], a["batch_size"], a["seed"],
             job.quiet, job.workers, job.skip_bad)
    job.shift_s, job.shifted = time.perf_counter() - t, True


def _extract_splits(job: _Job, dtype: str, shard_rows: int) -> None:
    """Every split's shards of this rank, under one progress bar, the BN shift in its place."""
    args, bs = job.args, job.args["batch_size"]
    order = [s for s in SPLITS if s in args["splits"]]
    # every split's shards, per rank: (global index, lo, hi) over the storage order
    plans = {split: rank_shards(len(job.ds.splits[split]), shard_rows,
                                min(bs, shard_rows) // 2 if _batch_stats(split, args) else 1, job.world)
             for split in order}
    # one bar for the whole extraction: the images of every split, advanced per batch (closed on
    # the way out, also by an error, so that an error message starts its own line)
    total = sum(hi - lo for s in order for _, lo, hi in plans[s][job.rank])
    with torch.no_grad(), progress(total=total, desc="extract", quiet=job.quiet, unit="img") as bar:
        for split in order:
            if split != "train" and args["bn_shift"] != "none" and not job.shifted:
                _shift(job)
            t_split = time.perf_counter()
            names = (["clean"] + [f"aug{i}" for i in range(1, args["train_views"] + 1)]) if split == "train" \
                else args["test_views"]
            _extract_split(job, split, names, plans[split][job.rank], dtype, bar)
            job.seconds += time.perf_counter() - t_split
            job.layout[split] = (names, sum(len(p) for p in plans[split]))
        if args["bn_shift"] != "none" and not job.shifted:
            _shift(job)


def _extract_split(job: _Job, split: str, names: list, shards: list, dtype: str, bar) -> None:
    """One split's shards of this rank (a shard already on disk is kept: resume)."""
    args, ex, sp = job.args, job.ex, job.ds.splits[split]
    bar.set_description(f"extract {split}")
    # Batch-statistics views: the source order is sorted by class, so batches drawn inside
    # contiguous shards would each hold a few classes and their BN statistics would carry the
    # label. The train rows are stored in a seeded random order instead, which makes every
    # shard a uniform sample of the split and its batches the papers' shuffled batches.
    row_order = train_row_order(len(sp), args["seed"]) if _batch_stats(split, args) else torch.arange(len(sp))
    for i, lo, hi in shards:
        rows = row_order[lo:hi]
        if not job.writer.has_shard(split, i):
            t, start = time.perf_counter(), ex.images_done
            g = torch.Generator().manual_seed(_seed(args["seed"], split, i))
            feats, keep = ex.views(split, rows, names, args["train_bn"], g, dtype, bar=bar)
            rows = rows if keep is None else rows[keep]         # undecodable images left out
            job.writer.submit(split, i, feats.numpy(), sp.labels[rows].numpy(), sp.index[rows].numpy())
            bar.set_postfix(fwd_img_s=f"{(ex.images_done - start) / max(time.perf_counter() - t, 1e-9):.0f}")
        else:
            bar.update(len(rows))                # kept from an interrupted run


def _gather_ranks(writer, mine: dict, rank: int) -> Optional[tuple]:
    """Every rank's shards on disk, then rank 0 gathers their records and run statistics:
    (the other ranks' shard records, every rank's statistics) on rank 0, None on the others."""
    records = writer.drain()
    distributed.barrier("the extraction")
    gathered = distributed.gather_objects((records, mine), "the extraction")
    if rank > 0:
        failed = distributed.all_gather_objects(None, "writing the manifest")[0]
        if failed:
            raise LtcacheError(f"rank 0 could not finish the cache: {failed}")
        return None
    more = {k: v for recs, _ in gathered[1:] for k, v in recs.items()}
    return more, [st for _, st in gathered]


def _extraction_record(job: _Job, ranks: list, more: Optional[dict], seconds: float, rate: float,
                       bare: float) -> dict:
    """The manifest's ``extraction`` entry: the options, the throughput, the ranks, the images left out."""
    args, world = job.args, job.world
    extraction = {**args, "device": str(job.dev), "amp": job.amp,
                  "images_forwarded": sum(st["images_forwarded"] for st in ranks),
                  "seconds": round(seconds, 2), "images_per_s": round(rate, 1), "bn_shift_seconds": round(job.shift_s, 2),
                  "bare_inference_images_per_s": round(bare, 1),
                  "bn_stats_file": BN_STATS if args["bn_shift"] != "none" else None, "world_size": world}
    if world > 1:
        # span: wall-clock start and end (epoch seconds) of each rank's extraction loop (BN shift included)
        extraction["ranks"] = [{k: st[k] for k in ("rank", "images_forwarded", "seconds", "images_per_s", "span")}
                               for st in ranks]
    if job.skip_bad:
        # not part of the key: a shard is the same with or without it unless an image was left out.
        # The count is of the rows absent from the shards (also those kept from an interrupted run),
        # the paths those this run saw.
        recs = {**job.writer.drain(), **(more or {})}
        absent = sum(len(job.ds.splits[s]) - sum(recs[shard_name(s, i)]["rows"] for i in range(job.layout[s][1]))
                     for s in job.layout)
        extraction["skip_bad_images"] = True
        extraction["skipped_images"] = {"count": int(absent),
                                        "first": [p for st in ranks for p in st["skipped_first"]][:SKIPPED_LISTED]}
    return extraction


def _manifest(job: _Job, spec_dict: dict, arch: str, ckpt: Path, ck_sha: str, ck_layout: Optional[dict],
              dtype: str, extraction: dict, head_kept: bool) -> dict:
    """The manifest body: dataset, checkpoint, extraction, and where the stage-1 classifier comes from."""
    ds = job.ds
    ck_info = {"path": str(ckpt.resolve()), "sha256": ck_sha}
    if ck_layout is None and job.args.get("weights") != "pretrained" and spec_dict.get("seed") is not None:
        # an ltcache stage-1 checkpoint: `ltcache train --seed N` drew its dataset with its own seed, so
        # the spec's seed is the backbone's training seed (what tells replicate backbones apart)
        ck_info["stage1_seed"] = int(spec_dict["seed"])
    if ck_layout is not None:
        ck_info["layout"] = {k: v for k, v in ck_layout.items() if k != "pool_input"}
    body = manifest_body({**spec_dict, **ds.spec.to_dict(), "groups": ds.groups}, ds.class_counts, arch,
                         job.model.feature_dim, ck_info, dtype, extraction)
    if ck_layout is not None:
        body["stage1_classifier"] = {"source": "given", "from": f"the {ck_layout['from']} checkpoint's classifier "
                                     f"({ck_layout['read']})", "head": ck_layout["head"],
                                     **({"note": ck_layout["note"]} if ck_layout.get("note") else {})}
    if job.args.get("weights") == "pretrained":
        body["stage1_classifier"] = {"source": "given", "from": f"the head of --pretrained {ckpt}"} if head_kept else {
            "source": "none", "why": f"the head of --pretrained {ckpt} does not have the dataset's {ds.num_classes} classes",
            "fix": f"train one from these weights (`ltcache train --arch {arch} --pretrained {ckpt}`) and extract its "
                   "stage1.pt, or save this cache's features to .npz and `ltcache import ... --fit-classifier`"}
    return body


def _finish(job: _Job, body: dict, more: Optional[dict], head_kept: bool) -> Path:
    """Rank 0 writes the manifest, the classifier and the BN statistics; the other ranks hear the outcome."""
    model, world = job.model, job.world
    bn_state = {k: v.detach().cpu() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    extra = {BN_STATS: (lambda p: torch.save(bn_state, p))} if job.args["bn_shift"] != "none" else None
    weight, bias = model.fc.weight.detach().cpu().numpy(), model.fc.bias.detach().cpu().numpy()
    if job.args.get("weights") == "pretrained" and not head_kept:
        weight, bias = np.zeros_like(weight), np.zeros_like(bias)      # a placeholder the loader accepts
    try:
        path = job.writer.finish(body, job.layout, weight, bias, extra_files=extra, more_records=more)
    except BaseException as exc:
        if world > 1:                            # the other ranks wait for the outcome
            distributed.all_gather_objects(str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                           "writing the manifest")
        raise
    if world > 1:
        distributed.all_gather_objects(None, "writing the manifest")
    return path
