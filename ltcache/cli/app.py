"""The ``ltcache`` click group and the error handling every subcommand shares."""
from __future__ import annotations

import sys

import click

from ltcache import __version__
from ltcache.errors import LtcacheError


class _Group(click.Group):
    """A click group that turns LtcacheError into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LtcacheError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: partial work is kept and resumes on the next run", err=True)
            sys.exit(130)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100,
                    "show_default": True}


@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="ltcache")
def cli() -> None:
    """Long-tailed recognition with a feature cache.

    \b
    Stage 1 trains a backbone once, extraction caches its penultimate features, and
    stage 2 re-trains every classifier method on the cached tensors in one sweep:
      ltcache train    --dataset cifar10 --imb-ratio 100 --out runs/c10   # stage 1
      ltcache extract  --ckpt runs/c10/stage1.pt                         # -> cache
      ltcache retrain  --method los --delta 0.98                         # one method
      ltcache bench    --all-methods --seeds 0,1,2                       # every method
    """
