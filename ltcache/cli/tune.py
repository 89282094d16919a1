"""``ltcache tune``: a thin layer over :func:`ltcache.stage2.api.tune`."""
from __future__ import annotations

from pathlib import Path

import click

from ltcache.cli.app import cli
from ltcache.cli.stage2 import PLUGIN_HELP, PluginCommand
from ltcache.errors import LtcacheError
from ltcache.options import PRECISIONS, PRESETS, SEARCHES, SELECT_METRICS, TEST_VIEWS


@cli.command("tune", cls=PluginCommand)
@click.option("--all-methods", is_flag=True, help="tune every registered method (with --plugin: its methods too)")
@click.option("--methods", "method_list", default=None, help="comma-separated method names")
@click.option("--budget", type=int, default=32,
              help="points of each method's search space tried in stage A (the same for every method; a method "
                   "with fewer distinct points, e.g. a closed form's candidate grid, tries all of them)")
@click.option("--search", type=click.Choice(SEARCHES), default="sobol",
              help="how the points are drawn: a scrambled Sobol sequence, random draws, or a grid of at most "
                   "--budget points")
@click.option("--select-metric", type=click.Choice(SELECT_METRICS), default="val-balanced",
              help="what picks each method's point on the val split (ties: the lower val NLL)")
@click.option("--space", "space_items", multiple=True,
              help="replace one dimension of the search space for the methods that have it (repeatable): "
                   "name=LOW:HIGH (linear), name=log:LOW:HIGH, or name=a,b,c (a choice), e.g. --space delta=0.5:0.99; "
                   "method.name for one method's only, e.g. --space la-loss.tau=0:1 (tau is also vs's and tau-norm's)")
@click.option("--tune-seeds", default="0", help="seeds of stage A (the val score is their mean)")
@click.option("--seeds", default="0,1,2,3,4", help="seeds the picks (and presets) are re-trained with in stage B")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), multiple=True,
              help="cache directory (default: the bundled cache); its val split must cover every class. Repeat it "
                   "for several caches: each is tuned on its own val split, one results file holds every run, and "
                   "the paper table is printed and written (see `ltcache table --help`)")
@click.option("--against", default="ce", show_default=True,
              help="with several caches: the reference method of the paper table's differences (a tuned method)")
@click.option("--test-views", type=click.Choice(TEST_VIEWS), default="all",
              help="average logits over the cached eval views, or use the center view only")
@click.option("--preset", type=click.Choice(PRESETS), default=None, show_default=False,
              help="preset the search ranges and the preset column start from (default: from the cache)")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="worker processes for CPU sweeps of small heads (1: this process only)")
@click.option("--clean-view", is_flag=True, help="also draw the clean train view in the epochs")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default=False,
              help="intra-op threads (default: the cores free when the command starts)")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="arithmetic of the training GEMMs in both stages: fp32 (exact), bf16 or tf32 (CUDA); see "
                   "`ltcache bench --help`")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="folder for results.json, tune.csv and tune.md (a folder already holding them is never "
                   "replaced without --force)")
@click.option("--force", is_flag=True, help="replace the results already in the --out folder")
@click.option("--quiet", is_flag=True, help="no progress bars or status lines")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path), help=PLUGIN_HELP)
def tune_cmd(all_methods, method_list, budget, search, select_metric, space_items, tune_seeds, seeds, cache_dir, against,
             test_views, preset, device, jobs, clean_view, threads, precision, out, force, quiet, plugins):
    """Tune every method on val with the same budget, then re-train the picks over the final seeds.

    \b
    Stage A trains every method x --budget points of its search space (`ltcache methods --space`)
    in one batched sweep that never sees the test split, and picks per method on val. Stage B
    re-trains each pick and each preset over --seeds and reports test.
    Examples:
      ltcache tune --all-methods --out results/tuned
      ltcache tune --methods los,mislas --budget 64 --select-metric val-nll
      ltcache bench --from-tune results/tuned/results.json --seeds 5,6,7   # re-run the picks
      ltcache tune --all-methods --cache runs/ir100-s0/cache --cache runs/ir100-s1/cache \
          --cache runs/ir10-s0/cache --out results/paper          # one paper table over datasets
      torchrun --standalone --nproc_per_node 4 -m ltcache tune --all-methods --out results/tuned
    Without --out the table is printed and nothing is written (the last line says so).
    """
    from ltcache.outputs import check_output_dir, output_lock
    from ltcache.stage2 import api
    from ltcache.stage2.methods import METHODS, get_method
    from ltcache.stage2.tune import OUTPUTS, format_tune_table, parse_space

    if all_methods == bool(method_list):
        raise LtcacheError("give exactly one of --all-methods or --methods a,b")
    names = list(METHODS) if all_methods else [get_method(n.strip()).name for n in method_list.split(",") if n.strip()]
    if not names:
        raise LtcacheError("--methods is empty; e.g. --methods ce,los")
    if budget < 1:
        raise LtcacheError(f"--budget must be >= 1 (got {budget}); e.g. --budget 32")
    api.parse_seeds(tune_seeds)
    api.parse_seeds(seeds)
    space = parse_space(space_items)
    from ltcache.cli.stage2 import _check_precision, join_ranks
    _check_precision(precision, device)
    if not join_ranks(device):              # another torchrun rank: trains its share, prints and writes nothing
        quiet, out = True, None
    caches = list(cache_dir) if len(cache_dir) > 1 else (cache_dir[0] if cache_dir else None)
    multi = isinstance(caches, list)
    if out is not None:
        from ltcache.stage2.multi import MULTI_OUTPUTS
        check_output_dir(out, force, what="--out folder", outputs=MULTI_OUTPUTS if multi else OUTPUTS)
        click.get_current_context().with_resource(output_lock(out))
    from ltcache.threads import apply_threads
    apply_threads(threads, quiet)
    results = api.tune(caches, names, budget=budget, search=search, select_metric=select_metric,
                       tune_seeds=api.parse_seeds(tune_seeds), seeds=api.parse_seeds(seeds), test_views=test_views,
                       device=device, quiet=quiet, preset=preset, out_dir=out, force=force, jobs=jobs,
                       clean_view=clean_view, space=space, precision=precision, against=against)
    from ltcache.distributed import is_main
    if not is_main():
        return
    if multi:
        from ltcache.stage2.paper_format import render
        click.echo(render(results, "terminal"), nl=False)
        if out is not None:
            click.echo(f"results: {out}/results.json, paper.md, paper.csv, paper.tex")
        return
    click.echo(format_tune_table(results))
    from ltcache.cli.stage2 import not_saved
    click.echo(f"results: {out}/results.json, tune.csv, tune.md" if out is not None else not_saved("DIR"))
