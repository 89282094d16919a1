"""The ``ltcache`` click group and the error handling every subcommand shares."""
from __future__ import annotations

import sys

import click

from ltcache import __version__
from ltcache.errors import LtcacheError


class _UsageLine(click.UsageError):
    """click's own usage error (a bad option value, a missing option, an unknown command) as one line:
    ``error: <click's message>; see 'ltcache CMD --help'``, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(self.message, err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    """The one-line form of a click usage error (click's help-for-no-arguments is left as it is)."""
    no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", ())
    if isinstance(exc, (_UsageLine, no_args_help)):
        return exc
    ctx = exc.ctx
    cmd = " ".join(["ltcache"] + (ctx.command_path.split()[1:] if ctx is not None else []))
    msg = " ".join(exc.format_message().split()).rstrip(".")
    return _UsageLine(f"error: {msg}; see '{cmd} --help'", ctx=ctx)


class _Group(click.Group):
    """A click group that turns LtcacheError and click's usage errors into a one-line message and exit
    code 2."""

    def parse_args(self, ctx: click.Context, args: list) -> list:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
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
      ltcache train    --dataset cifar10 --imb-ratio 100 --name c10   # -> runs/c10/stage1/stage1.pt
      ltcache extract  --name c10                                    # -> runs/c10/cache
      ltcache bench    --all-methods --cache runs/c10/cache          # every method
      ltcache retrain  --method los --delta 0.98                     # one method, the bundled cache
    """
