"""``ltcache predict``: classify image files with an exported model (a thin layer over
:func:`ltcache.predict.predict_images`)."""
from __future__ import annotations

from pathlib import Path

import click

from ltcache.cli.app import FilePath, cli


@cli.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=FilePath(path_type=Path), default=None,
              help="write the predictions CSV here instead of printing it (an existing file is never replaced "
                   "without --force; written to a temporary name and renamed)")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="images per forward pass")
@click.option("--flip/--no-flip", default=None, show_default=False,
              help="average the horizontally flipped view's logits too (default: as stored in the model, on "
                   "for the usual center+hflip cache, matching the number `retrain` reported)")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N")
@click.option("--force", is_flag=True, help="replace an existing --out file")
@click.option("--quiet", is_flag=True, help="no progress bar")
def predict_cmd(model, images, out, batch_size, flip, device, force, quiet) -> None:
    """Classify IMAGES (files, or folders searched recursively for image files) with MODEL, a
    file written by `ltcache retrain --export`: its stored preprocessing (RGB, resize, centre
    crop, mean/std) and test-time views are applied.

    \b
    CSV columns: path, class_index, class_name, probability (softmax of the averaged logits).
    Examples:
      ltcache predict model.pt photo.jpg
      ltcache predict model.pt data/cifar10-jpg/test --out preds.csv
    """
    from ltcache.outputs import check_output_file, output_lock
    from ltcache.predict import predict_images, predictions_csv, write_predictions

    if out is not None:                 # before any work: refused when it exists, locked until the end
        check_output_file(out, force, what="--out file")
        click.get_current_context().with_resource(output_lock(out, folder=False))
    rows = predict_images(model, list(images), batch_size=batch_size, flip=flip, device=device,
                          quiet=quiet or out is None)
    if out is None:
        click.echo(predictions_csv(rows), nl=False)
        return
    write_predictions(rows, out)
    click.echo(f"predictions: {out} ({len(rows)} images)")
