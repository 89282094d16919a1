"""``ltcache import``: a cache from features you already have (a thin layer over
:func:`ltcache.cache.importer.import_features`)."""
from __future__ import annotations

from pathlib import Path

import click

from ltcache.cli.app import cli
from ltcache.options import DTYPES


@cli.command("import")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache folder to write (written beside "
              "it under a temporary name, verified, then renamed; an existing cache is replaced only with --force).")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="The stage-1 classifier: a file (same formats) with weight [K, D] and bias [K], or a state dict "
                   "with one '*.weight' of D columns (e.g. torch.save(model.fc.state_dict(), 'fc.pt')).")
@click.option("--fit-classifier", is_flag=True,
              help="No classifier at hand: fit a plain cross-entropy linear head on the train features "
                   "(full-batch L-BFGS, deterministic; recorded in the manifest).")
@click.option("--name", default=None, help="Dataset name shown with results (default: imported).")
@click.option("--stage1-seed", "stage1_seed", type=int, default=None,
              help="The training seed of the backbone that made the features, when known: caches of one --name "
                   "with different seeds are replicate backbones in a multi-cache bench / tune.")
@click.option("--arch", default="unknown", help="What made the features (free text, recorded), e.g. "
              "'torchvision resnet18, ImageNet weights'.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", help="Storage dtype.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=8192, help="Rows per HDF5 shard.")
@click.option("--force", is_flag=True, help="Replace an existing cache in --out.")
@click.option("--quiet", is_flag=True, help="Print only errors.")
def import_cmd(sources, out, classifier, fit_classifier, name, stage1_seed, arch, dtype, shard_rows, force,
               quiet) -> None:
    """Build a verified cache from features you already have: no backbone is run.

    \b
    SOURCES: one or more files whose arrays are merged by name --
      .npz (np.savez), .pt/.pth (torch.save of a dict of tensors),
      .npy (one array, named by its file name) or a folder of .npy files, .h5/.hdf5.
    Key convention (N rows, D features, V views, K classes):
      train_features  [N, D] or [N, V, D]  views clean, aug1, aug2, ... (view 0 = clean)
      train_labels    [N] integers in 0..K-1   (class counts and Many/Medium/Few come from these)
      test_features   [N, D] or [N, 2, D]  views center, hflip
      test_labels     [N]
      val_features, val_labels             optional held-out split (for val-based choices)
      weight [K, D], bias [K]              optional stage-1 classifier (or --classifier FILE)
      class_names [K], <split>_index [N]   optional
    A nested dict / HDF5 group is joined with '_': {"train": {"features": F, "labels": y}}
    is train_features + train_labels.

    \b
    Examples:
      python -c "import numpy as np; np.savez('feats.npz', train_features=Ftr, train_labels=ytr,
                 test_features=Fte, test_labels=yte, weight=W, bias=b)"
      ltcache import feats.npz --out cache-mine
      ltcache import train_features.npy train_labels.npy test_features.npy test_labels.npy \\
          --out cache-mine --fit-classifier
      ltcache bench --all-methods --cache cache-mine

    Without --classifier, --fit-classifier or weight/bias in SOURCES the cache has no stage-1
    classifier: tau-norm, LWS, MARC, post-hoc LA and every method starting from stage 1 are
    refused on it (bench --all-methods leaves them out).
    """
    from ltcache.cache.importer import import_features
    from ltcache.cache.info import describe

    from ltcache import interrupts
    with interrupts.keeps(f"{out} is as it was before this command (the new cache is only swapped in once "
                          "whole); the same command starts over"):
        path = import_features(list(sources), out, classifier=classifier, fit_classifier_head=fit_classifier,
                               name=name, arch=arch, dtype=dtype, shard_rows=shard_rows, force=force,
                               command=_command(), quiet=quiet, stage1_seed=stage1_seed)
    if not quiet:
        click.echo(describe(path))


def _command() -> str:
    """``ltcache import ...`` as given: rebuilt from click's parsed parameters (sys.argv is the
    caller's, e.g. pytest's, when the command runs inside another program)."""
    ctx = click.get_current_context()
    args = [str(v) for v in ctx.params.get("sources", ())]
    for p in ctx.command.params:
        if p.name == "sources" or not isinstance(p, click.Option):
            continue
        value = ctx.params.get(p.name)
        if value is None or value is False or value == p.default:
            continue
        flag = max(p.opts, key=len)
        args += [flag] if value is True else [flag, str(value)]
    import shlex
    return shlex.join(["ltcache", "import", *args])
