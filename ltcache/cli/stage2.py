"""``ltcache retrain``, ``ltcache bench`` and ``ltcache methods``: thin layers over ltcache.stage2."""
from __future__ import annotations

from pathlib import Path

import click

from ltcache.cli.app import FilePath, StrictCommand, cli
from ltcache.errors import LtcacheError
from ltcache.options import PRECISIONS, PRESETS, SELECTS, TEST_VIEWS
from ltcache.threads import apply_threads

PLUGIN_HELP = ("a Python file of your own methods, losses, heads, samplers or post-hoc rules "
               "(ltcache.register_method / register_loss / register_head / register_sampler / register_posthoc), "
               "imported before the methods are resolved; `ltcache check-plugin FILE` checks it; repeatable")


def plugin_args(args) -> list[str]:
    """The --plugin values in raw command-line ``args`` (before click parses them)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            break
        if a == "--plugin" and i + 1 < len(args):
            out.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--plugin="):
            out.append(a.split("=", 1)[1])
        i += 1
    return out


def hyper_options(kind: str) -> list[click.Option]:
    """The hyper-parameter options, generated from the declarations (``ltcache.stage2.methods.
    option_table``): ``generic`` (lr, wd, epochs, ...) or ``all`` (also every registered method's
    own, e.g. --delta): one option per name, its help naming the methods that use it."""
    from ltcache.stage2.methods import GENERIC, option_table

    out = []
    for name, rows in option_table().items():
        if kind != "all" and name not in GENERIC:
            continue
        p = rows[0][0]
        typ = click.Choice(list(p.choices)) if p.choices else p.type
        if name in GENERIC:
            help_ = f"{p.help} (default: the method's preset)"
        else:
            help_ = "; ".join(f"{', '.join(users) or '-'}: {q.help} in {q.range_text()}" for q, users in rows)
            if len(rows) > 1 and rows[-1][1]:       # one name, a different hyper-parameter per method
                help_ += (f" (each method its own; one method's in a bench --grid or pipeline grid: "
                          f"METHOD.{name}, e.g. {rows[-1][1][0]}.{name}=...)")
        out.append(click.Option(["--" + name.replace("_", "-"), name], type=typ, default=None, show_default=False,
                                help=help_))
    return out


class PluginCommand(StrictCommand):
    """A stage-2 command whose ``--plugin`` files are imported before its options are parsed,
    and whose hyper-parameter options (``hyper``: "", "generic" or "all") are generated from the
    declarations -- a plugin's own hyper-parameters become options too."""

    def __init__(self, *args, hyper: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.hyper = hyper
        self._generated: tuple = ((), [])

    def parse_args(self, ctx: click.Context, args: list) -> list:
        from ltcache.plugins import load_plugins
        load_plugins(plugin_args(args))
        return super().parse_args(ctx, args)

    def get_params(self, ctx: click.Context) -> list:
        params = super().get_params(ctx)
        if not self.hyper:
            return params
        from ltcache.stage2.losses import LOSSES
        from ltcache.stage2.methods import METHODS
        key = (tuple(METHODS), tuple(LOSSES))
        if self._generated[0] != key:            # the same option objects while the registry is unchanged
            taken = {p.name for p in params}
            self._generated = (key, [o for o in hyper_options(self.hyper) if o.name not in taken])
        help_opt = self.get_help_option(ctx)
        return [p for p in params if p is not help_opt] + self._generated[1] + [p for p in params if p is help_opt]


def _plugin_option(f):
    return click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path),
                        help=PLUGIN_HELP)(f)


THREADS_HELP = ("intra-op threads (default: the cores free when the command starts -- the cores this process may "
                "use less the machine's 1-minute load -- so a busy machine is not oversubscribed)")


PRECISION_HELP = ("arithmetic of the training GEMMs: fp32 (exact, the default), bf16 (features and GEMMs in "
                  "bfloat16, parameters, loss and update in float32: ~2x faster GEMMs on GPUs and AVX-512 BF16 "
                  "CPUs) or tf32 (CUDA tensor cores)")


def _check_precision(precision: str, device: str) -> None:
    """Refuse a precision the device lacks before anything is written."""
    from ltcache.devices import resolve_device
    from ltcache.stage2.precision import check_precision
    check_precision(precision, resolve_device(device))


MULTI_CACHE_HELP = ("cache directory (default: the bundled cache); repeat it for several caches -- datasets, and "
                    "replicate backbones of one dataset (caches from different stage-1 seeds) -- to get one results "
                    "file with a run per cache and the paper table (see `ltcache table --help`)")
AGAINST_HELP = ("with several caches: the reference method of the paper table's differences (a method of the run)")


def _common(f=None, *, multi_cache: bool = False):
    if f is None:
        return lambda g: _common(g, multi_cache=multi_cache)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default="fp32",
                     show_default=True, help=PRECISION_HELP)(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None, show_default=False, help=THREADS_HELP)(f)
    f = click.option("--main-features", is_flag=True,
                     help="train every method on the cache's main features, even one whose source keeps BatchNorm "
                          "in another mode and whose feature set the cache holds (`ltcache methods`: the features "
                          "column; `ltcache extract --help`: --set)")(f)
    f = click.option("--from-tune", "from_tune", type=click.Path(path_type=Path), default=None,
                     help="re-run the configurations `ltcache tune --out DIR` chose (DIR/results.json) on the "
                          "same cache; options given here override them")(f)
    f = click.option("--quiet", is_flag=True, help="no progress bars or status lines")(f)
    f = click.option("--clean-view", is_flag=True,
                     help="also draw the clean train view in the epochs (default: a cache with augmented "
                          "views trains on those only, as the papers' stage 2 always augments)")(f)
    f = click.option("--jobs", type=click.IntRange(min=1), default=None,
                     help="worker processes for CPU sweeps of small heads (feature dim <= 1024), where one "
                          "process is bound by per-op and element-wise work (default: the cores torch "
                          "may use; 1: this process only)")(f)
    f = click.option("--preset", type=click.Choice(PRESETS), default=None, show_default=False,
                     help="hyper-parameter preset (default: from the cache's classes and feature size)")(f)
    f = click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N")(f)
    f = click.option("--test-views", type=click.Choice(TEST_VIEWS), default="all",
                     help="average logits over the cached test views, or use the center view only")(f)
    f = click.option("--select", type=click.Choice(SELECTS), default="last",
                     help="keep the last epoch or the best epoch on the val split (never test)")(f)
    f = click.option("--seeds", default="0", help="comma-separated seeds, each its own configuration")(f)
    if multi_cache:
        f = click.option("--against", default="ce", show_default=True, help=AGAINST_HELP)(f)
        f = click.option("--cache", "cache_dir", type=click.Path(path_type=Path), multiple=True,
                         help=MULTI_CACHE_HELP)(f)
    else:
        f = click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None,
                         help="cache directory (default: the bundled cache)")(f)
    return f


def _overrides(kwargs: dict) -> dict:
    """The hyper-parameter options given (every generated option left in ``kwargs``)."""
    from ltcache.stage2.methods import option_table
    names = set(option_table())
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names and kwargs[k] is not None}


RESULT_FILES = ("results.json", "summary.csv", "summary.md")


def not_saved(what: str) -> str:
    """The last line of a stage-2 command run without --out: the results were printed, not written."""
    return f"results not saved (printed only): add --out {what} to write them"


def join_ranks(device: str) -> bool:
    """Under torchrun, join the other ranks (left when the command ends); True on the rank that
    prints and writes files (rank 0, and always without torchrun)."""
    from ltcache import distributed
    if distributed.init_from_env(device):
        click.get_current_context().call_on_close(distributed.shutdown)
    return distributed.is_main()


def _claim_outputs(force: bool, files=(), folder=None, multi: bool = False) -> None:
    """Before any work: check each output -- ``files``: (flag, path, example name), ``folder``: (flag,
    path) of a results folder -- (an existing one is refused without --force), then lock each one
    until the command ends (a second run writing the same output is refused with this one's pid)."""
    from ltcache.outputs import check_output_dir, check_output_file, output_lock
    files = [(flag, Path(p), ex) for flag, p, ex in files if p is not None]
    if len({p.absolute() for _, p, _ in files}) < len(files):
        raise LtcacheError(f"{' and '.join(f for f, _, _ in files)} name the same file; give each its own name")
    for flag, path, example in files:
        if path.is_dir():
            raise LtcacheError(f"{flag} {path} is a folder; give a file name, e.g. {path / example}")
        check_output_file(path, force, what=f"{flag} file")
    if folder is not None and folder[1] is not None:
        from ltcache.stage2.multi import MULTI_OUTPUTS
        check_output_dir(folder[1], force, what=f"{folder[0]} folder", outputs=MULTI_OUTPUTS if multi else RESULT_FILES)
    ctx = click.get_current_context()
    for _, path, _ in files:
        ctx.with_resource(output_lock(path, folder=False))
    if folder is not None and folder[1] is not None:
        ctx.with_resource(output_lock(folder[1]))


def _check_export(m, method: str, seed_list: list) -> None:
    """``--export`` writes one model of a built-in head: refused before any work otherwise."""
    if len(seed_list) > 1:
        raise LtcacheError(f"--export writes one model but --seeds gives {len(seed_list)} seeds; "
                           "pass one seed with --export (e.g. --seeds 0)")
    if not m.closed_form:
        from ltcache.stage2.heads import HEADS
        if HEADS.get(m.head).plugin is not None:
            raise LtcacheError(f"--export writes linear, cosine and NCM heads; method {method}'s head '{m.head}' "
                               f"({HEADS.origin(m.head)}) is a plugin's: drop --export (its results are written)")


def _export(run, method: str, path: Path, test_views: str) -> None:
    """The first seed's head with the stage-1 backbone as a deployable model (:mod:`ltcache.export`,
    called here, outside stage 2, which never imports backbone code)."""
    from ltcache.export import export_model
    run_dict, layer = run.pairs[0]
    cache = run.cache
    if run_dict.get("features"):            # trained on a feature set: the backbone in that set's BN state
        from ltcache.cache import load
        from ltcache.cache.feature_sets import set_dir
        cache = load(set_dir(run.cache.path, run_dict["features"]), splits=("test",))
    export_model(cache, layer, path, meta={"method": method, "params": run_dict["params"],
                                           "features": run_dict.get("features", "main")},
                 views=["center"] if test_views == "center" else None)      # the views the number reports


def _print_and_write(results: dict, out) -> None:
    """A ``--through-backbone`` run's table, and its results file when ``--out`` is given."""
    from ltcache.stage2.results import format_table, write_json
    click.echo(format_table(results))
    if out is not None:
        write_json(results, out)
        click.echo(f"results: {out}")


@cli.command("retrain", cls=PluginCommand, hyper="all")
@click.option("--method", required=True, help="method name (see `ltcache methods`)")
@_common
@_plugin_option
@click.option("--out", type=FilePath(path_type=Path), default=None,
              help="write the results JSON here (an existing file is never replaced without --force; written "
                   "to a temporary name and renamed)")
@click.option("--export", "export_path", type=FilePath(path_type=Path), default=None,
              help="write a deployable model (stage-1 backbone + this head; one seed; an existing file is never "
                   "replaced without --force; written to a temporary name and renamed)")
@click.option("--force", is_flag=True, help="replace existing --out / --export files")
@click.option("--through-backbone", is_flag=True,
              help="reference slow path: re-run the frozen backbone on augmented images every step with "
                   "BatchNorm in train mode, as the papers' code does (needs --ckpt)")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None, help="stage1.pt for --through-backbone")
@click.option("--data-root", default=None, help="data root for --through-backbone")
@click.option("--no-augment", is_flag=True, help="--through-backbone: no crop/flip augmentation")
@click.option("--eval-bn", is_flag=True, help="--through-backbone: BatchNorm in eval mode (running statistics)")
def retrain_cmd(method, cache_dir, seeds, select, test_views, device, preset, jobs, quiet, clean_view, from_tune, threads,
                main_features, precision, out, export_path, force, through_backbone, ckpt, data_root, no_augment, eval_bn, plugins, **kwargs):
    """Re-train one stage-2 method on the cached features and print its metrics.

    \b
    Examples:
      ltcache retrain --method los --delta 0.98 --seeds 0,1,2
      ltcache retrain --method los --through-backbone --ckpt runs/c10/stage1.pt   # the papers' way
      ltcache retrain --plugin my_methods.py --method my-loss        # a method of your own
    """
    from ltcache.stage2 import api
    from ltcache.stage2.methods import get_method, validate_overrides
    from ltcache.stage2.results import format_table, write_json

    m = get_method(method)
    overrides = validate_overrides(m, _overrides(kwargs))
    seed_list = api.parse_seeds(seeds)
    _check_precision(precision, device)
    if export_path is not None:
        _check_export(m, method, seed_list)
    main = join_ranks(device)
    if main:
        _claim_outputs(force, files=[("--out", out, "results.json"), ("--export", export_path, "model.pt")])
    else:                                   # another torchrun rank: trains its share, prints and writes nothing
        quiet, out, export_path = True, None, None
    apply_threads(threads, quiet)
    if through_backbone or ckpt is not None or no_augment or eval_bn:
        if not through_backbone or ckpt is None:
            raise LtcacheError("--through-backbone needs --ckpt stage1.pt (and --ckpt, --no-augment, --eval-bn "
                               "only apply with --through-backbone)")
        if (cache_dir is not None or export_path is not None or select != "last" or clean_view or from_tune
                or precision != "fp32" or main_features):
            raise LtcacheError("--through-backbone reads images, not a cache: drop --cache, --export, --select, "
                               "--clean-view, --from-tune, --main-features and --precision")
        from ltcache.through_backbone import retrain_through_backbone
        if main:
            _print_and_write(retrain_through_backbone(
                ckpt, m.name, overrides, seeds=seed_list, augment=not no_augment, train_bn=not eval_bn,
                test_views=test_views, device=device, data_root=data_root, preset=preset, quiet=quiet), out)
        return
    run = api.retrain_layers(cache_dir, m.name, overrides, seeds=seed_list, select=select, test_views=test_views,
                             device=device, quiet=quiet, preset=preset, jobs=jobs, clean_view=clean_view,
                             from_tune=from_tune, precision=precision, main_features=main_features)
    if export_path is not None:
        _export(run, m.name, export_path, test_views)
    results = run.results
    if not main:
        return
    click.echo(format_table(results))
    if out is not None:
        write_json(results, out)
    click.echo(f"results: {out}" if out is not None else not_saved("FILE.json"))
    if export_path is not None:
        click.echo(f"model: {export_path}")


def parse_grid(items) -> dict:
    """``("delta=0.9,0.98", "la-loss.tau=0.5,1")`` -> {"delta": [0.9, 0.98], "la-loss.tau": [0.5, 1.0]}:
    short names, or qualified by a method (``method.param``); values converted and range-checked."""
    from ltcache.stage2.methods import check_key, join_key, split_key
    grid: dict = {}
    for item in items or ():
        if "=" not in item:
            raise LtcacheError(f"--grid '{item}' must look like name=v1,v2 (e.g. --grid delta=0.9,0.98 or "
                               "--grid la-loss.tau=0.5,1)")
        key, vals = item.split("=", 1)
        key = join_key(*split_key(key))
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not values:
            raise LtcacheError(f"--grid {key}= is empty; give at least one value, e.g. --grid {key}=0.9,0.98")
        try:
            grid[key] = [check_key(key, v) for v in values]
        except LtcacheError as exc:
            raise LtcacheError(f"--grid {key}: {exc}") from None
    return grid


GRID_HELP = ("name=v1,v2,... (repeatable): a Cartesian grid. A short name (tau) applies to every chosen method "
             "that has it, as that method's own hyper-parameter (`ltcache retrain --help` lists what each name "
             "means for each method); method.name (la-loss.tau=0.5,1) to one method only")


@cli.command("bench", cls=PluginCommand, hyper="generic")
@click.option("--all-methods", is_flag=True, help="every registered method (with --plugin: its methods too)")
@click.option("--methods", "method_list", default=None, help="comma-separated method names")
@click.option("--grid", multiple=True, help=GRID_HELP)
@_common(multi_cache=True)
@_plugin_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="directory for results.json, summary.csv and summary.md (several caches: results.json and the "
                   "paper table paper.md, paper.csv, paper.tex) (a folder already holding them is "
                   "never replaced without --force; each is written to a temporary name and renamed)")
@click.option("--force", is_flag=True, help="replace the results already in the --out folder")
@click.option("--strict", is_flag=True, help="a --grid key that some chosen method lacks is an error (default: a notice, "
              "and that method runs once without it)")
def bench_cmd(all_methods, method_list, grid, cache_dir, against, seeds, select, test_views, device, preset, jobs,
              quiet, clean_view, from_tune, threads, main_features, precision, out, force, strict, plugins, **kwargs):
    """Sweep many methods (x grid x seeds) in one batched run; one table sorted by All.

    Without --out the table is printed and nothing is written (the last line says so).
    CE is added as the reference row when --methods leaves it out (labelled under the table).

    \b
    With several --cache, each cache is swept in turn and one results file holds every run;
    caches of one dataset from different stage-1 seeds are its replicate backbones, and the
    paper table (methods x datasets, error bars over backbones x seeds) is printed and written.
    Examples:
      ltcache bench --all-methods --seeds 0,1,2 --out results/bench   # every method, the bundled cache
      ltcache bench --all-methods --cache runs/c10_ir100/cache        # your own cache
      ltcache bench --methods los,mislas --grid delta=0.9,0.98 --grid lr=0.001,0.0005
      ltcache bench --methods la-loss,vs --grid la-loss.tau=0.5,1 --grid vs.tau=1,1.5   # tau: each its own
      ltcache bench --from-tune results/tuned/results.json --seeds 5,6,7
      ltcache bench --all-methods --seeds 0,1,2 --cache runs/s0/cache --cache runs/s1/cache --out results/paper
      torchrun --standalone --nproc_per_node 4 -m ltcache bench --all-methods --out results/b
    """
    from ltcache.stage2 import api
    from ltcache.stage2.methods import METHODS, get_method
    from ltcache.stage2.results import format_table

    if all_methods == bool(method_list) and not (from_tune and not all_methods):
        raise LtcacheError("give exactly one of --all-methods or --methods a,b (or --from-tune FILE alone)")
    names = list(METHODS) if all_methods else [get_method(n.strip()).name for n in (method_list or "").split(",")
                                                if n.strip()]
    if not names and not from_tune:
        raise LtcacheError("--methods is empty; e.g. --methods ce,los")
    grid_d = parse_grid(grid)
    seed_list = api.parse_seeds(seeds)
    overrides = _overrides(kwargs)
    _check_precision(precision, device)
    caches = list(cache_dir) if len(cache_dir) > 1 else (cache_dir[0] if cache_dir else None)
    main = join_ranks(device)
    if main:
        _claim_outputs(force, folder=("--out", out), multi=isinstance(caches, list))
    else:                                   # another torchrun rank: trains its share, prints and writes nothing
        quiet, out = True, None
    apply_threads(threads, quiet)
    results = api.bench(caches, (None if all_methods else names) or None, grid=grid_d, seeds=seed_list, select=select, test_views=test_views,
                        device=device, quiet=quiet, preset=preset, overrides=overrides, out_dir=out, jobs=jobs,
                        clean_view=clean_view, from_tune=from_tune, precision=precision, against=against,
                        strict=strict, main_features=main_features)
    if not main:
        return
    if isinstance(caches, list):
        from ltcache.stage2.paper_format import render
        click.echo(render(results, "terminal"), nl=False)
        if out is not None:
            click.echo(f"results: {out}/results.json, paper.md, paper.csv, paper.tex")
        return
    click.echo(format_table(results))
    click.echo(f"results: {out}/results.json, summary.csv, summary.md" if out is not None else not_saved("DIR"))


@cli.command("methods", cls=PluginCommand)
@_plugin_option
@click.option("--preset", type=click.Choice(PRESETS), default="cifar", help="which defaults to show")
@click.option("--space", is_flag=True,
              help="print each method's search space for `ltcache tune`: every dimension's scale, range and "
                   "where the range comes from")
@click.option("--parts", is_flag=True,
              help="list the parts a method is made of -- losses, heads, samplers, post-hoc rules and what a "
                   "composed loss (ltcache.LossSpec) combines: its vectors, forms and terms -- with where each "
                   "was registered (built-in or a plugin file)")
@click.option("--notes", "show_notes", is_flag=True,
              help="print each method's notes: its initialisation and every deliberate deviation from its source")
def methods_cmd(plugins, preset, space, parts, show_notes):
    """List every stage-2 method: head, loss, sampler, defaults and source; then each method's
    stage-2 recipe at the preset (lr schedule, batches per epoch, parameters without weight decay,
    the cache's features it trains on: main, or a feature set where its source keeps BatchNorm in
    another mode -- see `ltcache extract --help`, --set; the measured gap between training on the
    cache and through the frozen backbone, test All), the script it follows and the repository@commit whose code it was checked against.

    \b
    Examples:
      ltcache methods                       # the CIFAR presets
      ltcache methods --preset imagenet     # the ImageNet presets
      ltcache methods --notes               # deviations from the sources, per method
      ltcache methods --space               # each method's search space for `ltcache tune`
      ltcache methods --parts --plugin my.py  # every registered part, a plugin's included
      ltcache methods --space --plugin my_methods.py
    """
    from ltcache.stage2.methods import METHODS

    if show_notes:
        for m in METHODS.values():
            click.echo(f"{m.name}: {m.notes or '-'}")
        return

    if parts:
        for line in parts_lines():
            click.echo(line)
        return
    if space:
        _print_spaces(preset)
        return
    rows = [("name", "head", "loss", "sampler", f"defaults ({preset})", "source")]
    for m in METHODS.values():
        d = m.defaults(preset)
        defaults = " ".join(f"{k}={v}" for k, v in d.items() if v is not None and k != "momentum")
        rows.append((m.name, m.head, m.loss, m.sampler, defaults, m.source))
    _print_rows(rows)
    click.echo("")
    _print_rows(_recipe_rows(preset))


def _print_spaces(preset: str) -> None:
    """``methods --space``: each method's search space, dimension by dimension."""
    from ltcache.stage2.methods import METHODS, method_space

    for m in METHODS.values():
        sp = method_space(m, preset)
        click.echo(m.name)
        if sp.candidates:
            (name, values), = sp.candidates.items()
            click.echo(f"  {name:<15} candidates {', '.join(f'{v:g}' for v in values)}  (closed form)")
        elif not sp.dims:
            click.echo("  (no hyper-parameters)")
        for d in sp.dims:
            click.echo(f"  {d.name:<15} {d.describe():<32} {d.source}")


def _recipe_rows(preset: str) -> list:
    """Each method's stage-2 recipe at the preset: schedule, batches per epoch, no-wd parameters, script."""
    from ltcache.stage2.methods import METHODS
    from ltcache.stage2.samplers import DEFAULT_STEPS

    rows = [("name", "schedule", "batches/epoch", "no wd", "features", "cache gap", f"follows ({preset})",
             "verified against")]
    steps_text = {"floor": "int(N/B)", "ceil": "ceil(N/B)", "ceil+1": "ceil(N/B)+1"}
    for m in METHODS.values():
        script, verified = m.script(preset)
        if m.closed_form:
            rows.append((m.name, "-", "-", "-", _features_text(m), m.cache_gap or "not measured",
                         script or "(closed form)", verified or "-"))
            continue
        rule = m.steps or DEFAULT_STEPS.get(m.sampler, "ceil")
        rows.append((m.name, str(m.defaults(preset).get("schedule")), steps_text.get(rule, rule),
                     ",".join(m.no_wd) or "-", _features_text(m), m.cache_gap or "not measured",
                     script or "stated default (no stage-2 script)",
                     verified or "not checked"))
    return rows


def _features_text(m) -> str:
    """The features a method trains on: ``main``, or its feature set per class count when the
    cache holds that set (e.g. ``bn-eval at K=10``)."""
    sets = ", ".join(name if k == "*" else f"{name} at K={k}" for k, name in m.feature_sets)
    return sets or "main"


def _print_rows(rows: list) -> None:
    """Rows of equal length, every column but the last padded to its widest cell."""
    n = len(rows[0]) - 1
    widths = [max(len(r[i]) for r in rows) for i in range(n)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:n], widths)) + "  " + r[n])


@cli.command("check-plugin")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="print only the summary line")
def check_plugin_cmd(file, quiet):
    """Run the common checks on every method, loss, head, sampler and post-hoc rule FILE registers.

    The same checks the test suite runs on the built-in entries, on a tiny generated cache (a few
    seconds): presets within their ranges, out-of-range values refused, the search space, the
    loss gradient against autograd (float64, mixed with every other loss), a head's backward
    against autograd, a sampler's indices, a post-hoc rule's layer, and a method trained in a
    mixed sweep equal to it trained alone and to a plain autograd + SGD loop. The first failure
    is one line naming the file, the entry and the fix (exit 2).

    \b
    Example:
      ltcache check-plugin examples/ib_loss.py
    """
    from ltcache.stage2.checks import check_plugin
    import torch

    torch.set_num_threads(1)
    n = check_plugin(str(file), report=(lambda s: None) if quiet else click.echo)
    click.echo(f"{file}: {n} checks passed")


def parts_lines() -> list[str]:
    """``ltcache methods --parts``: every registry's entries with their origins, and what a
    composed loss combines."""
    from ltcache.registry import registries
    from ltcache.stage2.losses import composable
    from ltcache.stage2.methods import METHODS  # noqa: F401  (every registry filled)

    out = []
    first = ("post-hoc rule", "head", "loss", "sampler")        # a fixed order, whichever module loaded first
    regs = registries()
    for kind in sorted(regs, key=lambda k: first.index(k) if k in first else len(first)):
        reg = regs[kind]
        if kind in ("method", "loss form", "loss term", "backbone"):
            continue
        out.append(("losses" if kind == "loss" else f"{kind}s") + ":")
        out += [f"  {n:<18} {reg.origin(n)}" for n in reg]
    comp = composable()
    out.append("composed losses (ltcache.LossSpec) combine:")
    out.append("  vectors  " + ", ".join(f"{k} (neutral {v:g})" for k, v in comp["vectors"].items()))
    out.append("  forms    " + ", ".join(comp["forms"]))
    for name, t in comp["terms"].items():
        coefs = ", ".join(f"{c}={v:g}" for c, v in t["coefs"].items())
        out.append(f"  term {name:<12} {coefs:<24} form {t['form']:<8} {t['origin']}")
    return out
