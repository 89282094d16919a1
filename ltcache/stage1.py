"""Stage 1: train a backbone on a long-tailed dataset with instance-balanced cross-entropy.

A plain loop in the style of torchvision's references/classification. Writes ``stage1.pt``
(last epoch, the one extraction uses) every epoch and ``best.pt`` (best val All among the evaluated
epochs), atomically, so an interrupted run continues with ``--resume``. Val and test are evaluated
every ``eval_every`` epochs and always at the last one; the other epochs record them as null.

Under torchrun each rank trains its even share of every global batch (``--batch-size``) with
DistributedDataParallel: all ranks draw the same permutation and augmentation from one seeded
generator, so the checkpoint (the generator state included) does not depend on the world size and
resumes with any number of ranks. Rank 0 alone checks, locks and writes ``--out`` and prints.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ltcache import distributed, interrupts
from ltcache.checkpoints import FORMAT, FORMAT_VERSION, load_checkpoint, read_pretrained, read_torch_file  # noqa: F401
from ltcache.data import DatasetSpec, build_dataset
from ltcache.devices import resolve_device
from ltcache.errors import LtcacheError
from ltcache.lock import OutputLock
from ltcache.metrics import fmt_pct, group_accuracy, per_class_accuracy
from ltcache.models import build_model
from ltcache.models.registry import check_arch, load_pretrained
from ltcache.options import MAX_BATCH_SIZE, MAX_EPOCHS, STAGE1_SCHEDULES
from ltcache.outputs import check_output_dir, save_torch
from ltcache.progress import echo, progress
from ltcache.version import __version__

CKPT_NAME, BEST_NAME = "stage1.pt", "best.pt"
DEFAULT_WARMUP = 5                           # the recipe's warm-up, shortened only when a run is too short for it
DROPS = ((0.8, 1e-2), (0.9, 1e-4))           # LDAM-DRW step schedule: (fraction of the epochs, lr factor)


def step_milestones(epochs: int) -> tuple[int, int]:
    """Epochs trained before each LDAM-DRW lr drop (x0.01, x0.0001): (160, 180) for 200 epochs.
    A drop at ``epochs`` or later never happens."""
    return int(round(DROPS[0][0] * epochs)), int(round(DROPS[1][0] * epochs))


def _drops_fit(epochs: int) -> bool:
    """The step drops that happen within the run fall on different epochs."""
    first, second = step_milestones(epochs)
    return not (first == second < epochs)


def epochs_before_first_drop(schedule: str, epochs: int) -> int:
    """Epochs the warm-up must end within: up to the first step drop, or the whole run for cosine."""
    return min(epochs, step_milestones(epochs)[0]) if schedule == "step" else epochs


@dataclass
class Stage1Options:
    """Every stage-1 option; defaults are the LDAM-DRW / MiSLAS CIFAR-LT recipe."""

    dataset: str = "cifar10"
    data_root: Optional[str] = None
    download: bool = False
    imb_ratio: float = 100.0
    profile: str = "exp"
    selection: str = "shuffle"
    val_per_class: Optional[int] = None      # None: auto (20, or enough for 1,000 val images)
    arch: str = "resnet32"
    pretrained: Optional[str] = None         # local backbone weights to start from (e.g. torchvision's)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    wd: float = 2e-4
    schedule: str = "step"
    warmup_epochs: Optional[int] = None      # None: 5, or the longest that fits a shorter run
    label_smoothing: float = 0.0
    mixup: float = 0.0
    maxnorm: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: Optional[bool] = None
    workers: int = 8
    out: Optional[str] = None
    resume: bool = False
    force: bool = False
    quiet: bool = False
    eval_every: int = 1                      # evaluate val/test every N epochs and at the last; 0: last only
    sync_bn: bool = False                    # torchrun on GPUs: BatchNorm statistics over the global batch
    warmup_auto: bool = field(default=False, init=False, repr=False)   # warmup_epochs was filled in

    # options that define the run (a resumed run must agree on them)
    RUN_KEYS = ("dataset", "imb_ratio", "profile", "selection", "val_per_class", "arch", "epochs",
                "batch_size", "lr", "momentum", "wd", "schedule", "warmup_epochs",
                "label_smoothing", "mixup", "maxnorm", "seed")

    def run_args(self) -> dict:
        """The options that define the run (recorded in the checkpoint as ``train_args``)."""
        return {k: getattr(self, k) for k in self.RUN_KEYS}

    def evaluates(self, epoch: int) -> bool:
        """Whether val and test are evaluated after (1-based) ``epoch``: every ``eval_every``
        epochs and always at the last one (``best.pt`` is chosen among these epochs)."""
        return epoch >= self.epochs or (self.eval_every > 0 and epoch % self.eval_every == 0)

    def check_schedule(self) -> None:
        """Refuse a warm-up or step schedule that does not fit ``epochs`` (one line, with the fix)."""
        if self.schedule == "step" and not _drops_fit(self.epochs):
            at = step_milestones(self.epochs)[0]
            fits = next(e for e in range(self.epochs + 1, self.epochs + 100) if _drops_fit(e))
            raise LtcacheError(f"--epochs {self.epochs} is too short for --schedule step: both lr drops "
                               f"(x0.01 at 80 % and x0.0001 at 90 % of the epochs) fall after epoch {at}; "
                               f"use --schedule cosine to train that short, or --epochs {fits} or more")
        room = epochs_before_first_drop(self.schedule, self.epochs)
        if self.warmup_epochs >= room:
            rule = (f"shorter than the {room} epochs before the first lr drop (80 % of {self.epochs})"
                    if room < self.epochs else f"shorter than the run ({self.epochs} epoch{'s' * (self.epochs > 1)})")
            fix = f"--warmup-epochs {room - 1}" + (" or less" if room > 1 else "")
            raise LtcacheError(f"--warmup-epochs {self.warmup_epochs} does not fit --epochs {self.epochs} with "
                               f"--schedule {self.schedule}: warm-up must be {rule}; use {fix}, or more --epochs")

    def validate(self) -> None:
        """Check every option (one-line errors naming the fix); fill in an unset warm-up."""
        if self.imb_ratio < 1:
            raise LtcacheError(f"--imb-ratio must be >= 1 (got {self.imb_ratio}); 100 is the usual CIFAR-LT setting")
        checks = [(self.epochs >= 1, "--epochs must be >= 1"), (self.batch_size >= 1, "--batch-size must be >= 1"),
                  (self.epochs <= MAX_EPOCHS, f"--epochs must be <= {MAX_EPOCHS} (got {self.epochs})"),
                  (self.batch_size <= MAX_BATCH_SIZE, f"--batch-size must be <= {MAX_BATCH_SIZE} (got {self.batch_size})"),
                  (self.lr > 0, "--lr must be > 0"), (self.wd >= 0, "--wd must be >= 0"),
                  (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
                  (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
                  (self.mixup >= 0, "--mixup must be >= 0 (0 turns it off)"),
                  (self.maxnorm >= 0, "--maxnorm must be >= 0 (0 turns it off)"),
                  (self.warmup_epochs is None or self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
                  (self.eval_every >= 0, "--eval-every must be >= 0 (0 evaluates only the last epoch)"),
                  (self.schedule in STAGE1_SCHEDULES, f"--schedule must be {' or '.join(STAGE1_SCHEDULES)}")]
        for ok, msg in checks:
            if not ok:
                raise LtcacheError(msg)
        if self.warmup_epochs is None or self.warmup_auto:
            # unset: the recipe's 5 epochs, or the longest warm-up that ends before the first drop
            room = epochs_before_first_drop(self.schedule, self.epochs)
            self.warmup_epochs, self.warmup_auto = max(0, min(DEFAULT_WARMUP, room - 1)), True
        self.check_schedule()
        check_arch(self.arch)                # the registry's "unknown arch" error (with a did-you-mean)
        if self.pretrained is not None and not Path(self.pretrained).is_file():
            raise LtcacheError(f"--pretrained {self.pretrained} not found; give a local weights file "
                               "(e.g. torch.save(torchvision.models.resnet18(weights=...).state_dict(), 'r18.pth'))")


def lr_at(opts: Stage1Options, epoch: int, step: int, steps: int) -> float:
    """Learning rate for a step (0-based ``epoch``): linear warm-up, then cosine to 0 or the
    LDAM-DRW steps (x0.01 at 80% and x0.0001 at 90% of training: epochs 160 and 180 of 200).
    ``opts`` must be validated (its warm-up filled in)."""
    t = epoch + step / max(1, steps)
    warmup = opts.warmup_epochs or 0
    if warmup and t < warmup:
        return opts.lr * (t + 1 / max(1, steps)) / warmup
    if opts.schedule == "cosine":
        return 0.5 * opts.lr * (1 + math.cos(math.pi * t / opts.epochs))
    first, second = step_milestones(opts.epochs)
    if epoch >= second:
        return opts.lr * DROPS[1][1]
    if epoch >= first:
        return opts.lr * DROPS[0][1]
    return opts.lr


def maxnorm_radius(weight: torch.Tensor, thresh: float) -> float:
    """LTWB MaxNorm radius: r = min_j ||w_j|| + thresh (max_j ||w_j|| - min_j ||w_j||)."""
    n = weight.detach().norm(dim=1)
    return float(n.min() + thresh * (n.max() - n.min()))


def _sha256(path) -> str:
    from ltcache.cache.manifest import sha256_file
    return sha256_file(path)


def _save(obj: dict, path: Path) -> None:
    """Write a checkpoint atomically (complete under its name or not there; a full disk is a
    one-line error)."""
    save_torch(obj, path)


def _default_out(opts: Stage1Options) -> Path:
    """``runs/<dataset>-ir<IR>-<arch>/stage1`` (the run-folder convention, ``ltcache.runs``)."""
    from ltcache.runs import default_name, stage1_dir
    return stage1_dir(default_name(opts.dataset, opts.imb_ratio, opts.arch))


def _prepare_out(opts: Stage1Options, out: Path) -> Optional[dict]:
    """Refuse to clobber a different run; return the checkpoint to resume from, if any."""
    ck_path = out / CKPT_NAME
    if opts.resume:
        ck = load_checkpoint(ck_path)
        old = ck.get("train_args", {})
        if opts.warmup_auto and isinstance(old.get("warmup_epochs"), int):
            opts.warmup_epochs = old["warmup_epochs"]        # an unset warm-up is the run's, whatever --epochs
            opts.check_schedule()
        # --epochs may change: resuming with more epochs extends a finished run
        diff = [k for k in opts.RUN_KEYS if k != "epochs" and k in old and old[k] != getattr(opts, k)]
        if diff:
            k = diff[0]
            raise LtcacheError(f"--resume: {out} was trained with {k}={old[k]!r}, not {getattr(opts, k)!r}; "
                               "use the same options or a new --out")
        return ck
    if ck_path.exists() and not opts.force:
        raise LtcacheError(f"{out} already holds a training run; use --resume to continue it, "
                           "--force to overwrite it, or another --out")
    return None


def _mixup(x, y, alpha, gen):
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def share(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous rows ``[lo, hi)`` of a batch of ``rows`` that ``rank`` of ``world`` takes: an even
    split, the first ``rows % world`` ranks one row more (rank 0 always has rows when there are any)."""
    base, extra = divmod(rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _ranks() -> tuple[int, int]:
    """(rank, world size) of the training: (0, 1) unless a process group of several ranks is joined."""
    return (distributed.rank(), distributed.world()) if distributed.active() else (0, 1)


def _top1(model, x, amp: bool, device) -> torch.Tensor:
    with torch.autocast(device.type, enabled=amp):
        return model(x).float().cpu()


@torch.no_grad()
def evaluate(model, ds, split: str, device, batch_size: int = 500, amp: bool = False, workers: int = 8) -> dict:
    """All/Many/Medium/Few top-1 of the model on one split (eval mode, center view).

    Under torchrun every rank evaluates its contiguous share of the split and the top-1 predictions
    are all-gathered (a few bytes a row), so every rank returns the same report and no GPU idles
    through a large test set."""
    sp = ds.splits[split]
    if len(sp) == 0:
        return {"all": None, "many": None, "medium": None, "few": None}
    model.eval()
    rank, world = _ranks()
    lo, hi = share(len(sp), rank, world)           # one process: the whole split
    preds, labels = [], []
    if getattr(sp, "streamed", False):
        for b in ds.loader(split, torch.arange(lo, hi), batch_size, ["center"], workers=workers,
                           pin_memory=device.type == "cuda"):
            preds.append(_top1(model, ds.normalize(b.images[:, 0].to(device)), amp, device).argmax(1))
            labels.append(torch.as_tensor(b.labels).cpu())
    else:
        for i in range(lo, hi, batch_size):
            x = ds.normalize(sp.images(torch.arange(i, min(i + batch_size, hi))).to(device))
            preds.append(_top1(model, x, amp, device).argmax(1))
        labels.append(sp.labels[lo:hi])
    mine = (torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    parts = distributed.all_gather_objects(mine, what=f"the evaluation of {split}")
    pred, lab = torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])
    return group_accuracy(per_class_accuracy(pred, lab, ds.num_classes), ds.class_counts)


def preflight(opts: Stage1Options, world: int) -> None:
    """Every check that needs no data and no other rank (one-line errors, identical on every rank):
    the options, the global batch split over ``world`` ranks, --sync-bn on a GPU."""
    opts.validate()
    if opts.batch_size % world:
        lower = opts.batch_size - opts.batch_size % world
        fix = f"--batch-size {lower} or {lower + world}" if lower else f"--batch-size {world}"
        raise LtcacheError(f"--batch-size {opts.batch_size} (the global batch) does not split evenly over "
                           f"{world} ranks; use {fix} (a multiple of {world}) or another --nproc_per_node")
    if opts.sync_bn and resolve_device(opts.device).type == "cpu":
        raise LtcacheError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA/XPU only); drop it on CPU "
                           "(each rank then normalises over its own share of the batch)")


def _same_everywhere(opts: Stage1Options) -> dict:
    """What every rank must agree on (paths like --data-root and --out may differ between machines)."""
    return {**opts.run_args(), "eval_every": opts.eval_every, "sync_bn": opts.sync_bn, "resume": opts.resume,
            "force": opts.force, "amp": opts.amp, "device": opts.device, "version": __version__}


def train_stage1(opts: Stage1Options) -> Path:
    """Train stage 1 and return the path of ``stage1.pt``. One run per ``--out`` at a time: a
    second one is refused with the first one's pid.

    Under torchrun (a process group joined, e.g. by ``ltcache train``) every rank trains its share
    of each global batch with DistributedDataParallel; rank 0 alone checks, locks and writes
    ``--out`` and hands the checkpoint to resume from to the others."""
    rank, world = _ranks()
    preflight(opts, world)
    distributed.check_same(_same_everywhere(opts), "training run")
    out = Path(opts.out) if opts.out else _default_out(opts)
    held: dict = {}

    def claim():
        check_output_dir(out, force=True, what="--out folder")      # not a file, writable: before any work
        held["created"] = not out.exists()
        held["lock"] = OutputLock(out, what="stage-1 training")
        held["lock"].acquire()
        try:
            return _prepare_out(opts, out), opts.warmup_epochs  # refuse before any work or any file is written
        except BaseException:
            _release(held, out)
            raise

    resume_ck, opts.warmup_epochs = distributed.on_main(claim, "the check of --out",
                                                        undo=lambda: _release(held, out))
    try:
        return _train(opts, out, resume_ck)
    finally:
        _release(held, out)


def _release(held: dict, out: Path) -> None:
    lock = held.pop("lock", None)
    if lock is not None:
        lock.release()
        if held.get("created"):
            with contextlib.suppress(OSError):
                out.rmdir()                  # refused before anything was written: leave no empty folder


def _build(spec: DatasetSpec, opts: Stage1Options, quiet: bool):
    """The dataset; with --download under torchrun each machine's first rank fetches it before the others read it."""
    def build():
        return build_dataset(spec, opts.data_root, download=opts.download, quiet=quiet, workers=opts.workers)
    if not (opts.download and distributed.active()):
        return build()
    first = int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
    ds = build() if first else None
    distributed.barrier("the dataset download")
    return ds if first else build()


def _wrap(model, device):
    """DistributedDataParallel around ``model`` under torchrun; the model itself otherwise."""
    if not distributed.active():
        return model
    from torch.nn.parallel import DistributedDataParallel
    # BatchNorm buffers: rank 0's are broadcast before each forward (the default), so the model is rank 0's
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _mixup_local(x, y, alpha, gen, rows: int, lo: int):
    """Mixup of this rank's rows ``[lo, lo + len(x))`` of a streamed global batch of ``rows``: the
    shared generator draws the global batch's (lam, permutation) as one process would; each rank
    mixes within its own rows in the order of those rows' partners (one process: the same mixup)."""
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(rows, generator=gen)[lo:lo + x.shape[0]]
    local = perm.argsort().argsort().to(x.device)
    return lam * x + (1 - lam) * x[local], y, y[local], lam


def _stream_epoch(ds, perm, seeds, batch_size: int, rank: int, world: int, device, workers: int):
    """This rank's (uint8 -> normalised) share of each global batch of a streamed train split, read
    and augmented (RandomResizedCrop + flip, seeded per row) by the dataset's loader."""
    n = len(perm)
    pos = [torch.arange(s + lo, s + hi) for s in range(0, n, batch_size)
           for lo, hi in [share(min(batch_size, n - s), rank, world)]]
    pos = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)
    for b in ds.loader("train", perm[pos], batch_size // world, ["train"], seeds=seeds[pos], workers=workers,
                       pin_memory=device.type == "cuda"):
        yield ds.normalize(b.images[:, 0].to(device, non_blocking=True)), \
            torch.as_tensor(b.labels).to(device, non_blocking=True)


def _train(opts: Stage1Options, out: Path, resume_ck: Optional[dict]) -> Path:
    rank, world = _ranks()
    quiet = opts.quiet or rank != 0          # one voice: rank 0 prints
    phase = {"what": "the set-up"}
    fix = f"{out / CKPT_NAME} holds the last complete epoch: continue with --resume (any number of ranks)"

    def kept() -> str:
        if (out / CKPT_NAME).exists():
            return f"{out / CKPT_NAME} holds the last complete epoch; the same command with --resume continues from it"
        return "no epoch was complete, nothing was written; the same command starts over"
    with interrupts.keeps(kept), distributed.watch(lambda: phase["what"], fix):
        return _loop(opts, out, resume_ck, rank, world, quiet, phase)


def schedule_text(opts: Stage1Options) -> str:
    """The lr schedule as it will run (after any warm-up adjustment), e.g.
    ``step: lr 0.1, warm-up 5 epochs, x0.01 after epoch 160, x0.0001 after 180``."""
    warm = f"warm-up {opts.warmup_epochs} epoch{'s' * (opts.warmup_epochs != 1)}" + (
        " (shortened to fit)" if opts.warmup_auto and opts.warmup_epochs < DEFAULT_WARMUP else "")
    if opts.schedule == "cosine":
        return f"cosine: lr {opts.lr:g} to 0 over {opts.epochs} epochs, {warm}"
    first, second = step_milestones(opts.epochs)
    drops = [f"x0.01 after epoch {first}"] if first < opts.epochs else []
    drops += [f"x0.0001 after epoch {second}"] if second < opts.epochs else []
    return (f"step: lr {opts.lr:g}, {warm}, " + (", ".join(drops) if drops else
            f"no lr drop within {opts.epochs} epochs (the drops fall at 80 % and 90 %)"))


def header(opts: Stage1Options, ds, device, world: int, out: Path, start: int) -> str:
    """What stage 1 is about to do, printed before the first epoch."""
    counts = ", ".join(f"{name} {len(sp):,}" for name, sp in ds.splits.items())
    resumed = f", resuming after epoch {start}" if start else ""
    n = torch.get_num_threads()
    from ltcache.imbalance import ir_text
    return (f"stage 1: {opts.dataset} ({ir_text(opts.imb_ratio, ds.class_counts)}, "
            f"{opts.profile} profile; {ds.num_classes} classes; "
            f"{counts} images)\n"
            f"  {opts.arch}, {opts.epochs} epochs{resumed}, batch {opts.batch_size}; {schedule_text(opts)}\n"
            f"  device {device}, {n} thread{'s' * (n != 1)}, {opts.workers} workers"
            f"{f', {world} ranks' if world > 1 else ''} -> {out}")


@dataclass
class _Run:
    """One stage-1 training's state, shared by its steps (set-up, epochs, evaluation, checkpoints)."""
    opts: Stage1Options
    out: Path
    rank: int
    world: int
    quiet: bool
    device: torch.device
    amp: bool
    ds: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    gen: torch.Generator
    pretrained: Optional[dict]
    sync_bn: bool
    history: list = field(default_factory=list)
    start: int = 0
    best_val: float = -1.0
    radius: Optional[float] = None
    net: object = None
    streamed: bool = False
    train_images: Optional[torch.Tensor] = None
    train_labels: Optional[torch.Tensor] = None
    n: int = 0
    steps: int = 0


def _loop(opts: Stage1Options, out: Path, resume_ck: Optional[dict], rank: int, world: int, quiet: bool,
          phase: dict) -> Path:
    """Set up, resume, then one epoch at a time: train, evaluate, checkpoint, report."""
    run = _setup(opts, out, resume_ck, rank, world, quiet)
    if run.start >= opts.epochs:
        echo(f"{out / CKPT_NAME} already finished {run.start} epochs; nothing to do", quiet)
        return out / CKPT_NAME
    _prepare_epochs(run)
    for epoch in range(run.start, opts.epochs):
        phase["what"] = f"epoch {epoch + 1}"
        total_loss, seen, t0 = _train_epoch(run, epoch)
        _maxnorm(run)
        # the model is rank 0's: its BatchNorm statistics (DDP broadcasts them before each forward)
        distributed.broadcast_(list(run.model.buffers()), what=f"the BatchNorm statistics of epoch {epoch + 1}")
        rec, improved = _evaluate_epoch(run, epoch, total_loss, seen, time.time() - t0)
        if rank == 0:
            _checkpoint(run, epoch, improved)
            interrupts.test_point("epoch")
        _report_epoch(run, epoch, rec)
        distributed.barrier(f"the end of epoch {epoch + 1}")   # gloo: a rank that is gone is named
    return out / CKPT_NAME


def _device_and_amp(opts: Stage1Options, world: int) -> tuple[torch.device, bool]:
    device = resolve_device(opts.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())   # LOCAL_RANK's GPU (set when joining)
    amp = (device.type == "cuda") if opts.amp is None else bool(opts.amp and device.type == "cuda")
    return device, amp


def _model(opts: Stage1Options, ds, device, world: int, resume_ck: Optional[dict]):
    """The network on its device (pretrained weights loaded unless resuming), and its pretrained record."""
    torch.manual_seed(opts.seed)
    model = build_model(opts.arch, ds.num_classes)
    pretrained = None
    if opts.pretrained is not None and resume_ck is None:       # a resumed run has its weights already
        kept = load_pretrained(model, read_pretrained(opts.pretrained))
        pretrained = {"path": str(Path(opts.pretrained).resolve()), "sha256": _sha256(opts.pretrained),
                      "classifier": "taken from the weights" if kept else "fresh (the weights' head has other classes)"}
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if opts.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)   # same parameters and state-dict keys
    return model, pretrained


def _setup(opts: Stage1Options, out: Path, resume_ck: Optional[dict], rank: int, world: int, quiet: bool) -> _Run:
    """The data, model, optimizer and generator of a run; a resumed run's state restored."""
    device, amp = _device_and_amp(opts, world)
    spec = DatasetSpec(opts.dataset, imb_ratio=opts.imb_ratio, profile=opts.profile,
                       selection=opts.selection, seed=opts.seed, val_per_class=opts.val_per_class)
    ds = _build(spec, opts, quiet)
    model, pretrained = _model(opts, ds, device, world, resume_ck)
    optimizer = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum, weight_decay=opts.wd)
    run = _Run(opts, out, rank, world, quiet, device, amp, ds, model, optimizer,
               torch.amp.GradScaler(device.type, enabled=amp),
               torch.Generator().manual_seed(opts.seed),     # the same on every rank: one global permutation
               pretrained, bool(opts.sync_bn and world > 1))
    if resume_ck is not None:
        model.load_state_dict(resume_ck["state_dict"])
        optimizer.load_state_dict(resume_ck["optimizer"])
        if resume_ck.get("scaler"):
            run.scaler.load_state_dict(resume_ck["scaler"])
        if resume_ck.get("rng") is not None:
            run.gen.set_state(resume_ck["rng"])
        run.history, run.start = list(resume_ck["history"]), int(resume_ck["epoch"])
        run.pretrained = resume_ck.get("pretrained")
        run.best_val = float(resume_ck.get("best_val", -1.0))
    return run


def _prepare_epochs(run: _Run) -> None:
    """The wrapped network, the output folder, the header, and the train split (on the GPU when it fits)."""
    opts, device = run.opts, run.device
    run.net = _wrap(run.model, device)
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
    echo(header(opts, run.ds, device, run.world, run.out, run.start), run.quiet)
    train = run.ds.splits["train"]
    run.streamed = bool(getattr(train, "streamed", False))
    run.n = n = len(train)
    run.steps = n // opts.batch_size + (1 if n % opts.batch_size else 0)
    if not run.streamed:
        run.train_images, run.train_labels = train.images(), train.labels
        if device.type == "cuda":
            run.train_images, run.train_labels = run.train_images.to(device), run.train_labels.to(device)


def _train_epoch(run: _Run, epoch: int) -> tuple[float, int, float]:
    """One epoch of SGD steps; returns (summed loss, images seen, start time)."""
    opts = run.opts
    run.net.train()
    t0 = time.time()
    perm = torch.randperm(run.n, generator=run.gen)
    total_loss, seen, batches = 0.0, 0, None
    if run.streamed:                         # per-row augmentation seeds: one draw per epoch, whatever the world size
        seeds = torch.randint(2**31, (run.n,), generator=run.gen)
        batches = _stream_epoch(run.ds, perm, seeds, opts.batch_size, run.rank, run.world, run.device, opts.workers)
    bar = progress(range(run.steps), desc=f"epoch {epoch + 1}/{opts.epochs}", quiet=run.quiet, unit="step")
    for s in bar:
        idx = perm[s * opts.batch_size:(s + 1) * opts.batch_size]
        loss = _step(run, epoch, s, idx, batches)
        total_loss += float(loss) * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", img_s=f"{seen / (time.time() - t0):.0f}")
    bar.close()
    return total_loss, seen, t0


def _batch(run: _Run, idx: torch.Tensor, lo: int, hi: int, batches):
    """This step's images and labels on the device (augmented, normalized)."""
    ds, device = run.ds, run.device
    if run.streamed:
        xb, yb = next(batches) if hi > lo else (None, None)
        if xb is None:               # no rows of a tiny last batch: an empty forward keeps DDP in step
            xb = torch.zeros(0, 3, ds.image_size, ds.image_size, device=device)
            yb = torch.zeros(0, dtype=torch.long, device=device)
    else:                            # every rank augments the whole global batch: one generator stream
        xb = run.train_images[idx.to(run.train_images.device)].to(device, non_blocking=True)
        yb = run.train_labels[idx.to(run.train_labels.device)].to(device, non_blocking=True)
        xb = ds.normalize(ds.augment(xb, run.gen if xb.device.type == "cpu" else None))
    if device.type == "cuda":
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb, yb


def _mixed(run: _Run, xb, yb, rows: int, lo: int, hi: int):
    """Mixup when asked (the global batch's, on this rank's rows): (xb, yb, ya, yb2, lam)."""
    ya = yb2 = None
    lam = 1.0
    if run.opts.mixup > 0:
        if run.streamed:
            xb, ya, yb2, lam = _mixup_local(xb, yb, run.opts.mixup, run.gen, rows, lo)
        else:                        # the global batch's mixup, then this rank's rows
            xb, ya, yb2, lam = _mixup(xb, yb, run.opts.mixup, run.gen)
    if run.world > 1 and not run.streamed:
        xb, yb = xb[lo:hi], yb[lo:hi]
        if ya is not None:
            ya, yb2 = ya[lo:hi], yb2[lo:hi]
    return xb, yb, ya, yb2, lam


def _step(run: _Run, epoch: int, s: int, idx: torch.Tensor, batches) -> torch.Tensor:
    """One SGD step on the global batch ``idx`` (this rank's share); returns the batch's mean loss."""
    opts, world = run.opts, run.world
    lo, hi = share(len(idx), run.rank, world)
    xb, yb = _batch(run, idx, lo, hi, batches)
    for g in run.optimizer.param_groups:
        g["lr"] = lr_at(opts, epoch, s, run.steps)
    xb, yb, ya, yb2, lam = _mixed(run, xb, yb, len(idx), lo, hi)
    with torch.autocast(run.device.type, enabled=run.amp):
        logits = run.net(xb)
        if hi == lo:
            loss = logits.sum() * 0.0
        elif ya is not None:
            loss = lam * F.cross_entropy(logits, ya, label_smoothing=opts.label_smoothing) + \
                (1 - lam) * F.cross_entropy(logits, yb2, label_smoothing=opts.label_smoothing)
        else:
            loss = F.cross_entropy(logits, yb, label_smoothing=opts.label_smoothing)
    # DDP averages the ranks' gradients: weighting each rank's mean loss by its share of the
    # global batch (1 for an even split) makes that the global batch's mean-loss gradient
    weight = (hi - lo) * world / len(idx)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss * weight if weight != 1 and hi > lo else loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    loss = loss.detach()
    if world > 1:                    # the global batch's mean loss, the same on every rank
        rows_loss = loss.float().reshape(1) * (hi - lo)
        loss = distributed.all_reduce_sum_(rows_loss, "the loss reduction")[0] / len(idx)
    if not torch.isfinite(loss):
        raise LtcacheError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
    return loss


def _maxnorm(run: _Run) -> None:
    """LTWB MaxNorm: radius from the weights at the first projection, projection once per epoch."""
    if run.opts.maxnorm > 0:
        with torch.no_grad():
            weight = run.model.fc.weight
            if run.radius is None:
                run.radius = maxnorm_radius(weight, run.opts.maxnorm)
            norms = weight.norm(dim=1, keepdim=True)
            weight.mul_((run.radius / norms.clamp_min(1e-12)).clamp(max=1.0))


def _evaluate_epoch(run: _Run, epoch: int, total_loss: float, seen: int, seconds: float) -> tuple[dict, bool]:
    """Val and test of an evaluated epoch, recorded in the history; whether val improved (best.pt)."""
    opts, steps = run.opts, run.steps
    evaluated = opts.evaluates(epoch + 1)
    val = evaluate(run.model, run.ds, "val", run.device, amp=run.amp, workers=opts.workers) if evaluated else None
    test = evaluate(run.model, run.ds, "test", run.device, amp=run.amp, workers=opts.workers) if evaluated else None
    rec = {"epoch": epoch + 1, "train_loss": total_loss / max(1, seen), "lr": lr_at(opts, epoch, steps - 1, steps),
           "val": val, "test": test, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
    run.history.append(rec)
    val_all = val["all"] if val is not None and val["all"] is not None else -1.0
    improved = val_all > run.best_val        # best.pt: the best of the evaluated epochs
    if improved:
        run.best_val = val_all
    return rec, improved


def _checkpoint(run: _Run, epoch: int, improved: bool) -> None:
    """``stage1.pt`` (and ``best.pt`` when val improved): everything a resume needs."""
    opts, ds, model = run.opts, run.ds, run.model
    ck = {"format": FORMAT, "format_version": FORMAT_VERSION, "ltcache_version": __version__,
          "arch": opts.arch, "num_classes": ds.num_classes, "feature_dim": model.feature_dim,
          "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
          "dataset": {**ds.spec.to_dict(), "groups": ds.groups, "image_size": ds.image_size,
                      "mean": list(ds.mean), "std": list(ds.std)},
          "train_args": opts.run_args(), "pretrained": run.pretrained, "history": run.history, "epoch": epoch + 1,
          "epochs": opts.epochs, "eval_every": opts.eval_every,
          "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": run.gen.get_state(),
          "best_val": run.best_val, "world_size": run.world, "sync_bn": run.sync_bn}
    if improved:
        _save(ck, run.out / BEST_NAME)
    _save(ck, run.out / CKPT_NAME)


def _report_epoch(run: _Run, epoch: int, rec: dict) -> None:
    val, test = rec["val"], rec["test"]
    scores = (f"val {fmt_pct(val['all'])}  test {fmt_pct(test['all'])} (many {fmt_pct(test['many'])} / "
              f"med {fmt_pct(test['medium'])} / few {fmt_pct(test['few'])})" if test is not None else "not evaluated")
    echo(f"epoch {epoch + 1}/{run.opts.epochs}  loss {rec['train_loss']:.4f}  {scores}  {rec['seconds']:.1f}s  "
         f"{rec['images_per_s']:.0f} img/s", run.quiet)
