"""``ltcache extract`` and ``ltcache info``: the feature cache."""
from __future__ import annotations

import click

from ltcache.cli.app import cli
from ltcache.options import BN_SHIFTS, CHECKPOINT_LAYOUTS, DTYPES, FEATURE_SETS, PROFILES, PROTOCOLS, SELECTIONS, TRAIN_BN


def _names(text: str) -> list:
    return [s.strip() for s in text.split(",") if s.strip()]


@cli.command("extract")
@click.option("--ckpt", default=None, type=click.Path(dir_okay=False), help="stage1.pt from `ltcache train`, or a plain state dict (then give --arch and --dataset); or use --pretrained.")
@click.option("--pretrained", default=None, type=click.Path(dir_okay=False),
              help="Instead of --ckpt: local backbone weights (a state dict, e.g. torchvision's ImageNet weights) with "
                   "--arch and --dataset. Their classifier is the stage-1 classifier when it has the dataset's "
                   "classes; otherwise the cache has none (methods that start from it are refused).")
@click.option("--name", default=None, help="Run name of `ltcache train --name NAME`: --ckpt runs/NAME/stage1/stage1.pt, "
              "--cache runs/NAME/cache.")
@click.option("--cache", default=None, help="Cache directory (default: runs/NAME/cache for runs/NAME/stage1/stage1.pt; "
              "else 'cache' beside the checkpoint).")
@click.option("--splits", default="train,val,test", help="Splits to extract.")
@click.option("--test-views", default="center,hflip", help="Views of val/test to store: center and/or hflip (the stage-2 commands average the stored views; their --test-views picks all or center).")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="faithful",
              help="faithful: 4 augmented train views with BN batch statistics over batches of 64 and an instance BN "
                   "shift -- the protocol measured closest to the papers' stage 2 through the backbone; clean: "
                   "the clean view only, eval-mode BN, batch 256 (fast). The options below override it.")
@click.option("--train-views", type=click.IntRange(min=0), default=None, show_default=False, help="Augmented views per training image (random crop + flip) besides the clean one (faithful: 4, clean: 0).")
@click.option("--train-bn", type=click.Choice(TRAIN_BN), default=None, show_default=False,
              help="BatchNorm for augmented train views: running statistics (eval) or batch statistics of random batches (the papers' stage 2; faithful: batch).")
@click.option("--bn-shift", type=click.Choice(BN_SHIFTS), default=None, show_default=False,
              help="Before val/test: move BN running statistics on augmented train batches drawn instance- or class-balanced (MiSLAS: class; faithful: instance, clean: none).")
@click.option("--bn-shift-passes", type=click.IntRange(min=1), default=1, help="Passes over the training set for --bn-shift.")
@click.option("--set", "feature_set", type=click.Choice(tuple(FEATURE_SETS)), default=None,
              help="Write the cache's feature set of this name into CACHE/sets/NAME instead of its main features: "
                   "bn-eval = running BN statistics everywhere, no shift (--train-bn running --bn-shift none), read by "
                   "the methods whose source keeps BN in eval mode; bn-b512 = the faithful protocol with BN batches "
                   "of 512 (--batch-size 512), read by the methods whose source trains stage 2 on batches of 512 "
                   "(`ltcache methods`: the features column).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", help="Storage dtype of the features.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=8192, help="Rows per HDF5 shard.")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, show_default=False, help="Backbone batch size, also the BN batch for --train-bn batch (faithful: 64, clean: 256).")
@click.option("--device", default="auto", help="auto | cpu | cuda.")
@click.option("--data-root", default=None, help="Data root (default: ./data or $LTCACHE_DATA).")
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default=False,
              help="DataLoader workers decoding images (default: min(cores, 8)).")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default=False,
              help="Intra-op threads (default: the cores free when the command starts, as the stage-2 commands).")
@click.option("--arch", default=None, help="Backbone of a foreign (plain state dict) checkpoint or of --pretrained: "
              "a registered name or torchvision:NAME (any torchvision classification model, e.g. torchvision:resnet18).")
@click.option("--from", "source", type=click.Choice(CHECKPOINT_LAYOUTS),
              default=None, help="Layout of a foreign --ckpt: the papers' checkpoints (LOS, MiSLAS, cRT, LDAM-DRW, "
              "BagofTricks-LT) or a torchvision state dict; default: the one that fits (its classifier becomes the "
              "stage-1 classifier).")
@click.option("--dataset", default=None, help="Dataset of a foreign checkpoint (as for `ltcache train`).")
@click.option("--imb-ratio", type=float, default=100.0, help="Foreign checkpoint: imbalance ratio.")
@click.option("--profile", type=click.Choice(PROFILES), default="exp", help="Foreign checkpoint: LT profile.")
@click.option("--selection", type=click.Choice(SELECTIONS), default="shuffle", help="Foreign checkpoint: selection rule.")
@click.option("--val-per-class", type=click.IntRange(min=0), default=None, show_default=False, help="Foreign checkpoint: val images per class (default: as `ltcache train`).")
@click.option("--seed", type=int, default=0, help="Seed of augmentation, BN batches and BN shift (and a foreign dataset's selection).")
@click.option("--skip-bad-images", "skip_bad", is_flag=True,
              help="Streamed (large-image) datasets: leave out images that cannot be decoded instead of stopping; "
                   "the manifest counts them and names the first few.")
@click.option("--force", is_flag=True, help="Replace a cache made from another checkpoint or other options.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def extract_cmd(ckpt, name, splits, test_views, threads, **kw) -> None:
    """Run the frozen backbone once over every split -> HDF5 feature shards + manifest.

    \b
    Examples:
      ltcache extract --name c10_ir100       # runs/c10_ir100/stage1/stage1.pt -> runs/c10_ir100/cache (faithful)
      ltcache extract --ckpt runs/c10_ir100/stage1/stage1.pt --protocol clean --cache runs/c10_ir100/cache-clean
      ltcache extract --arch torchvision:resnet18 --pretrained r18.pth --dataset cifar10 --imb-ratio 100
      ltcache extract --ckpt ckpt.best.pth.tar --from ldam-drw --arch resnet32 --dataset cifar10 --imb-ratio 100
      ltcache extract --name c10_ir100 --set bn-eval   # + runs/c10_ir100/cache/sets/bn-eval (eval-mode BN)
    An interrupted extraction resumes where it stopped when re-run with the same options.

    \b
    Several processes or machines (each rank extracts a contiguous share of every split into its
    own shards; rank 0 writes the manifest; --cache on a file system every node shares):
      torchrun --nproc_per_node 2 -m ltcache extract --name c10_ir100 --protocol clean
    Eval-mode views equal one process's cache row for row; augmented train views depend on the
    number of processes, and an interrupted run resumes with the number it started with.
    """
    from ltcache.cache.extraction import extract
    from ltcache.cache.info import describe
    from ltcache.cli.stage2 import join_ranks

    from ltcache.threads import apply_threads, default_workers

    apply_threads(threads)
    kw["workers"] = kw["workers"] or default_workers()
    if name is not None:
        from ltcache.errors import LtcacheError
        from ltcache.runs import stage1_dir
        if ckpt is not None or kw["pretrained"] is not None:
            raise LtcacheError("give --name (reads runs/NAME/stage1/stage1.pt) or --ckpt / --pretrained, not both")
        ckpt = str(stage1_dir(name) / "stage1.pt")
    main = join_ranks(kw["device"])
    path = extract(ckpt, splits=_names(splits), test_views=_names(test_views), **kw)
    if main and not kw["quiet"]:
        click.echo(describe(path))


@cli.command("info")
@click.argument("cache", required=False)
@click.option("--verify", is_flag=True, help="Check every file: the manifest's checksum, each shard's sha256, "
              "rows and HDF5 readability, the classifier; exit 2 naming the first damaged file.")
def info_cmd(cache, verify) -> None:
    """Summarise a cache: dataset, classes and groups, splits and views, size, provenance.

    Without CACHE, the default (bundled) cache.

    \b
    Examples:
      ltcache info                                   # the bundled cache
      ltcache info --verify runs/c10_ir100/cache     # also check every file's checksum
    """
    import sys

    from ltcache.cache import default_cache_path
    from ltcache.cache.info import describe, verify as verify_cache

    path = cache or default_cache_path()
    if verify:
        click.echo(verify_cache(path, quiet=not sys.stderr.isatty()))
        return
    click.echo(describe(path))
