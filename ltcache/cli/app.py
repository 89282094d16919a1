"""The ``ltcache`` click group and the error handling every subcommand shares."""
from __future__ import annotations

import os
import sys

import click

from ltcache import interrupts
from ltcache.version import __version__
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


REPEATABLE_ANYWAY = {"cache_dir"}       # --cache: its own rules (several caches), not checked here


def repeated_options(params: list, args: list) -> list[str]:
    """The single-valued options given more than once in raw ``args`` (click would keep the last one
    silently), e.g. ``["--seeds"]``; options with ``multiple=True`` and counts may repeat."""
    by_flag = {}
    for p in params:
        if isinstance(p, click.Option):
            for flag in p.opts + p.secondary_opts:
                by_flag[flag] = p
    seen: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            break
        flag = a.split("=", 1)[0] if a.startswith("--") else a
        p = by_flag.get(flag)
        if p is not None:
            if not (p.multiple or p.count or p.name in REPEATABLE_ANYWAY):
                seen.setdefault(p.name, []).append(flag)
            if not p.is_flag and "=" not in a:
                i += 1                           # its value
        i += 1
    return [flags[0] for flags in seen.values() if len(flags) > 1]


class FilePath(click.Path):
    """A file option's path (an output or input file, never a folder): a value ending in '/' is
    refused by :class:`StrictCommand` (click's Path would drop the slash and write a file named
    like the folder)."""


def _is_file_option(p) -> bool:
    return isinstance(p.type, FilePath) or (isinstance(p.type, click.Path) and not p.type.dir_okay)


def slashed_files(params: list, args: list) -> list[tuple[str, str]]:
    """(flag, value) of each file option whose raw value ends with a path separator."""
    by_flag = {f: p for p in params if isinstance(p, click.Option) for f in p.opts}
    out = []
    for i, a in enumerate(args):
        if a == "--":
            break
        flag, _, value = a.partition("=") if a.startswith("--") else (a, "", "")
        p = by_flag.get(flag)
        if p is None or not _is_file_option(p):
            continue
        value = value if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
        if value.endswith(("/", os.sep)):
            out.append((flag, value))
    return out


class StrictCommand(click.Command):
    """A command that refuses a single-valued option given twice (one line, exit 2) instead of
    silently keeping the last value, and a file option whose value ends with '/'."""

    def parse_args(self, ctx: click.Context, args: list) -> list:
        params = self.get_params(ctx)
        twice = repeated_options(params, list(args))
        if twice:
            raise click.UsageError(f"{twice[0]} given more than once; give it once (it takes one value)", ctx=ctx)
        for flag, value in slashed_files(params, list(args)):
            raise click.UsageError(f"{flag} {value} ends with '/', but {flag} names a file; give a file name, "
                                   f"e.g. {flag} {value}results.json" if flag == "--out" else
                                   f"{flag} {value} ends with '/', but {flag} names a file; drop the slash or "
                                   "add a file name", ctx=ctx)
        return super().parse_args(ctx, args)


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


_Group.command_class = StrictCommand


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
