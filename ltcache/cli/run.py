"""``ltcache run``: a whole experiment from a pipeline file."""
from __future__ import annotations

import click

from ltcache.cli.app import cli


@cli.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Output directory (default: the file's [pipeline] out, e.g. runs/<name>).")
@click.option("--device", default="auto", help="auto | cpu | cuda.")
@click.option("--data-root", default=None, help="Data root (default: the file's [dataset] data_root, ./data or $LTCACHE_DATA).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override [stage1] epochs (e.g. a short CPU run).")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default=False,
              help="Intra-op threads for every step (default: the cores free when the command starts).")
@click.option("--force", is_flag=True, help="Replace the outputs of a step whose inputs changed (otherwise refused).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_cmd(pipeline, out, device, data_root, epochs, threads, force, quiet) -> None:
    """Run PIPELINE (a TOML file): stage 1 -> extract -> sweep, into one output directory.

    A step whose inputs are unchanged is skipped (stage 1 by its options, extraction by the
    checkpoint and options, the sweep and tune by the plan hash their results.json records), so an
    interrupted pipeline resumes and a finished one does nothing; a step whose outputs came from
    other inputs is refused unless --force, which replaces them.

    \b
    Examples:
      ltcache run pipelines/smoke.toml           # -> runs/smoke/{stage1,cache,results,tune}
      ltcache run pipelines/smoke.toml --force   # after editing the file: re-run what changed

    Many GPUs or machines: torchrun --nproc_per_node 8 -m ltcache run pipelines/imagenet_lt_resnext50.toml
    (stage 1 with DistributedDataParallel, extraction split across the ranks, the sweep's
    configurations split across the ranks; rank 0 prints and writes the results).
    """
    from ltcache.cli.stage2 import join_ranks
    from ltcache.pipeline import run_pipeline
    from ltcache.stage2.results import format_table

    from ltcache.threads import apply_threads

    apply_threads(threads)
    main = join_ranks(device)
    from ltcache import interrupts
    # stage 1 and extraction say more precisely what they keep while they run
    with interrupts.keeps("the completed steps are kept; the same command skips them and goes on"):
        results = run_pipeline(pipeline, out=out, device=device, data_root=data_root, quiet=quiet or not main,
                               epochs=epochs, force=force)
    if quiet and main:
        click.echo(format_table(results))
