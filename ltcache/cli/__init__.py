"""Command-line interface: every command is a thin layer over a public Python function."""
from __future__ import annotations

from ltcache.cli.app import cli

# Importing a command module registers its subcommands on ``cli``.
from ltcache.cli import train as _train  # noqa: F401,E402
from ltcache.cli import extract as _extract  # noqa: F401,E402
from ltcache.cli import stage2 as _stage2  # noqa: F401,E402
from ltcache.cli import report as _report  # noqa: F401,E402
from ltcache.cli import run as _run  # noqa: F401,E402
from ltcache.cli import tune as _tune  # noqa: F401,E402
from ltcache.cli import import_cmd as _import  # noqa: F401,E402
from ltcache.cli import predict as _predict  # noqa: F401,E402
from ltcache.cli import table as _table  # noqa: F401,E402


def main() -> None:
    """Console-script entry point (also ``python -m ltcache``): this process's signals are ltcache's."""
    from ltcache import interrupts
    interrupts.OWNED = True
    try:
        cli(prog_name="ltcache")
    finally:
        interrupts.ending()


__all__ = ["cli", "main"]
