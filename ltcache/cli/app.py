"""The ``ltcache`` click group and the error handling every subcommand shares."""
from __future__ import annotations

import os
import sys

import click

from ltcache import __version__, interrupts
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
        interrupts.install()                       # SIGTERM ends a command like Ctrl-C: one line, clean-up runs
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
        except LtcacheError as exc:
            interrupts.ending()
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            _stopped(exc, ctx)


def _stopped(exc: KeyboardInterrupt, ctx: click.Context) -> None:
    """End an interrupted command with one line saying what was kept (exit 128 + signal). Under
    torchrun, SIGTERM means torchrun is stopping every rank because one ended: name that rank, exit 2."""
    interrupts.ending()                              # a second SIGTERM must not cut this short
    note = getattr(exc, "note", None) or interrupts.current_note()
    if isinstance(exc, interrupts.Stopped) and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        from ltcache import distributed
        if distributed.env_world() > 1:
            command = " ".join(["ltcache", *([ctx.invoked_subcommand] if ctx.invoked_subcommand else [])])
            click.echo(f"error: {distributed.lost_on_stop(f'`{command}`', note)}", err=True)
            sys.exit(2)
    click.echo(interrupts.message(exc, note), err=True)
    sys.exit(interrupts.exit_code(exc))


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
