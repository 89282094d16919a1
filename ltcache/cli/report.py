"""``ltcache report``: figures and report.html from a results JSON (thin layer over make_report)."""
from __future__ import annotations

import click

from ltcache.cli.app import cli
from ltcache.options import FIGURE_FORMATS


@cli.command("report")
@click.argument("results", type=click.Path(dir_okay=True, path_type=str))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="output directory (default: <results dir>/report); one that already holds a report is "
                   "never replaced without --force; each file is written to a temporary name and renamed")
@click.option("--methods", default=None,
              help="comma-separated configuration or method names to draw (default: all)")
@click.option("--format", "fmt", type=click.Choice(FIGURE_FORMATS), default="png", help="figure format")
@click.option("--quiet", is_flag=True, help="print nothing on success")
@click.option("--force", is_flag=True, help="replace the report already in the --out folder")
def report_cmd(results: str, out_dir, methods, fmt: str, quiet: bool, force: bool) -> None:
    """Draw the report of a `bench` / `retrain` RESULTS file (results.json or its directory).

    \b
    Figures: per-class accuracy along the tail, Logits Magnitude / RSD per class group,
    reliability diagrams (15 bins), per-class logits and margins, Many / Medium / Few bars;
    plus report.html with the results table (opens offline).

    \b
    Examples (needs matplotlib: pip install -e '.[plot]'):
      ltcache report results/results.json --out results/report
      ltcache report runs/c10_ir100/results --methods ce,los,mislas --format svg
    """
    from ltcache.errors import LtcacheError
    from ltcache.report import make_report
    names = None
    if methods is not None:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        if not names:
            raise LtcacheError("--methods is empty; give comma-separated names, e.g. --methods ce,los")
    make_report(results, out_dir=out_dir, methods=names, fmt=fmt, quiet=quiet, force=force)
