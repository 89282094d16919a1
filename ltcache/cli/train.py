"""``ltcache train``: stage 1."""
from __future__ import annotations

import click

from ltcache.cli.app import cli
from ltcache.options import PROFILES, SELECTIONS, STAGE1_SCHEDULES


@cli.command("train")
@click.option("--dataset", default="cifar10", help="cifar10 | cifar100 | imagefolder:PATH (folder or .tar.gz) | splitlist:DIR/NAME.")
@click.option("--data-root", default=None, help="Where datasets live (default: ./data or $LTCACHE_DATA).")
@click.option("--download/--no-download", default=False, help="Let torchvision download CIFAR (needs a network).")
@click.option("--imb-ratio", type=float, default=100.0, help="Imbalance ratio n_max/n_min (>= 1).")
@click.option("--profile", type=click.Choice(PROFILES), default="exp", help="Long-tailed profile of the class counts.")
@click.option("--selection", type=click.Choice(SELECTIONS), default="shuffle",
              help="Which images a class keeps: first n_i in source order (LOS, LTWB) or seeded shuffle (LDAM-DRW, MiSLAS).")
@click.option("--val-per-class", type=click.IntRange(min=0), default=None, show_default=False, help="Balanced val images per class, held out of the full training set before the long-tailed profile draws from the rest (default: 20, or enough for 1,000 val images: 100 per class on CIFAR-10; 0: no val).")
@click.option("--arch", default="resnet32", help="Backbone: resnet32, resnet34-cifar, resnet18, resnet50, resnext50_32x4d, "
              "or torchvision:NAME -- any torchvision classification model (e.g. torchvision:mobilenet_v3_small), "
              "built with weights=None; its last Linear becomes the classifier.")
@click.option("--pretrained", default=None, type=click.Path(dir_okay=False),
              help="Local weights to start from (a state dict, e.g. torchvision's ImageNet weights saved with "
                   "torch.save(model.state_dict(), PATH)); nothing is downloaded. Their classifier is kept when it "
                   "has the dataset's classes, else a fresh one is trained.")
@click.option("--epochs", type=click.IntRange(min=1), default=200, help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, help="Batch size.")
@click.option("--lr", type=float, default=0.1, help="Base learning rate (SGD).")
@click.option("--momentum", type=float, default=0.9, help="SGD momentum.")
@click.option("--wd", type=float, default=2e-4, help="Weight decay.")
@click.option("--schedule", type=click.Choice(STAGE1_SCHEDULES), default="step",
              help="cosine to 0, or step (x0.01 at 80%, x0.0001 at 90% of the epochs, as LDAM-DRW; refused "
                   "when both drops would fall on the same epoch: 5-7 epochs).")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=None, show_default=False,
              help="Linear warm-up epochs; must end before the first lr drop (step) or the last epoch (cosine). "
                   "Default: 5, or the longest that fits a shorter run.")
@click.option("--label-smoothing", type=float, default=0.0, help="Label smoothing epsilon.")
@click.option("--mixup", type=float, default=0.0, metavar="ALPHA", help="Mixup alpha (MiSLAS stage 1 uses 1.0); 0 = off.")
@click.option("--maxnorm", type=float, default=0.0, metavar="THRESH", help="LTWB MaxNorm threshold (e.g. 0.1); 0 = off.")
@click.option("--eval-every", type=click.IntRange(min=0), default=1, metavar="N",
              help="Evaluate val and test every N epochs and always after the last; 0: only after the last. "
                   "best.pt is the best of the evaluated epochs.")
@click.option("--seed", type=int, default=0, help="Seed of the LT selection, val split and training.")
@click.option("--device", default="auto", help="auto | cpu | cuda.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (default: on for CUDA, off on CPU).")
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default=False,
              help="DataLoader workers decoding images (default: min(cores, 8)).")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default=False,
              help="Intra-op threads (default: the cores free when the command starts, as the stage-2 commands).")
@click.option("--name", default=None, help="Run name: writes runs/NAME/stage1/ (then `ltcache extract --name NAME` "
              "writes runs/NAME/cache/). Default: <dataset>-ir<IR>-<arch>, e.g. cifar10-jpg-ir100-resnet32.")
@click.option("--out", default=None, help="Output directory instead of runs/NAME/stage1.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--force", is_flag=True, help="Overwrite a different run in --out.")
@click.option("--sync-bn", is_flag=True,
              help="Under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm) instead of "
                   "each rank's share; refused on CPU.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def train_cmd(**kw) -> None:
    """Stage 1: train a backbone on a long-tailed dataset -> OUT/stage1.pt (+ best.pt).

    \b
    Example (CIFAR-10 as a JPEG image folder, IR 100, ResNet-32 -> runs/c10_ir100/stage1/stage1.pt):
      ltcache train --dataset imagefolder:data/cifar10-jpg.tar.gz --imb-ratio 100 --arch resnet32 --name c10_ir100
      ltcache extract --name c10_ir100                  # -> runs/c10_ir100/cache

    \b
    Several GPUs or machines: torchrun splits each --batch-size global batch evenly over the ranks
    (same lr; one process's training but for BatchNorm, which normalises each rank's share unless --sync-bn):
      torchrun --nproc_per_node 4 -m ltcache train ... --batch-size 256
      torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m ltcache train ...
    """
    from ltcache import distributed
    from ltcache.cli.stage2 import join_ranks
    from ltcache.stage1 import Stage1Options, load_checkpoint, preflight, train_stage1

    from ltcache.errors import LtcacheError
    from ltcache.runs import stage1_dir

    from ltcache.threads import apply_threads, default_workers

    apply_threads(kw.pop("threads"))
    kw["workers"] = kw["workers"] or default_workers()
    name = kw.pop("name")
    if name is not None and kw["out"] is not None:
        raise LtcacheError("give --name (writes runs/NAME/stage1) or --out, not both")
    if name is not None:
        kw["out"] = str(stage1_dir(name))
    opts = Stage1Options(**kw)
    preflight(opts, distributed.env_world())       # refused on every rank before waiting for the others
    if not join_ranks(opts.device):
        train_stage1(opts)
        return                                     # rank 0 reads the checkpoint and prints
    path = train_stage1(opts)
    ck = load_checkpoint(path)
    # the last evaluated epoch (the last one, unless a resume asked for fewer epochs than were run)
    last = next((h for h in reversed(ck["history"]) if h.get("val") is not None), {})
    from ltcache.metrics import fmt_pct
    secs = [h["seconds"] for h in ck["history"]]
    val, test = (last.get("val") or {}).get("all"), (last.get("test") or {}).get("all")
    click.echo(f"stage 1 done: {ck['epoch']}/{ck['epochs']} epochs, val All {fmt_pct(val)}, test All {fmt_pct(test)}, "
               f"{sum(secs) / max(1, len(secs)):.1f} s/epoch -> {path}")
