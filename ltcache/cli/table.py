"""``ltcache table``: the paper table of a multi-cache results file (a thin layer over
:mod:`ltcache.stage2.paper_table` and :mod:`ltcache.stage2.paper_format`)."""
from __future__ import annotations

from pathlib import Path

import click

from ltcache.cli.app import cli
from ltcache.options import TABLE_FORMATS


@cli.command("table")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(TABLE_FORMATS), default="terminal",
              show_default=True, help="how the table is written")
@click.option("--against", default=None,
              help="reference method of the differences (default: the one the run was given, ce unless set)")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="write the table to this file (an existing file is never replaced without --force)")
@click.option("--force", is_flag=True, help="replace the --out file")
def table_cmd(results: Path, fmt: str, against, out, force: bool) -> None:
    """Print the paper table of a `bench` / `tune` run over several caches.

    \b
    Methods as rows, datasets as column groups (All, Many / Medium / Few where the dataset has
    them) with mean ± std over backbones x stage-2 seeds, each method's average rank, the best
    of each column marked, and each method's paired difference from --against with a 95 %
    t-interval over backbones (over stage-2 seeds only when a dataset has one backbone).
    Examples:
      ltcache table results/paper
      ltcache table results/paper/results.json --format latex --against los --out table.tex
    """
    from ltcache.outputs import check_output_file, write_text
    from ltcache.stage2.multi import load_multi
    from ltcache.stage2.paper_format import render
    from ltcache.stage2.paper_table import resolve_against
    doc = load_multi(results)
    if out is not None:
        check_output_file(out, force, what="--out file")
    text = render(doc, fmt, resolve_against(doc, against))
    if out is None:
        click.echo(text, nl=False)
    else:
        write_text(out, text)
        click.echo(f"table: {out}")
