"""Help that teaches: every command's --help shows an example; `ltcache --help`, every command's
--help and `ltcache methods` (the registry as data) do not load torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ltcache.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def test_every_command_help_has_an_example():
    missing = [name for name, cmd in cli.commands.items() if f"ltcache {name}" not in (cmd.help or "")]
    assert not missing, missing
    for name in ("bench", "tune"):                      # the stage-2 sweeps say how to run under torchrun
        assert "torchrun" in cli.commands[name].help


def test_top_level_help_does_not_import_torch():
    code = ("import sys\nfrom ltcache.cli import cli\n"
            "try:\n    cli(['--help'], prog_name='ltcache')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "ltcache train" in res.stdout and "bench" in res.stdout


# Run in a fresh interpreter: every invocation in-process (CliRunner), then torch must not have been imported.
_NO_TORCH = """
import sys
from click.testing import CliRunner
from ltcache.cli import cli

runner = CliRunner()
calls = [["methods"], ["methods", "--space"], ["methods", "--preset", "imagenet"], ["methods", "--notes"],
         ["methods", "--parts"], ["--help"]] + [[name, "--help"] for name in sorted(cli.commands)]
for args in calls:
    res = runner.invoke(cli, args, prog_name="ltcache")
    assert res.exit_code == 0, (args, res.output, res.exception)
    assert "torch" not in sys.modules, f"ltcache {' '.join(args)} imported torch"
print(runner.invoke(cli, ["methods", "--space"]).output)
"""


def test_methods_and_every_help_do_not_import_torch():
    res = subprocess.run([sys.executable, "-c", _NO_TORCH], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "los" in res.stdout and "delta" in res.stdout and "lr" in res.stdout     # the spaces were printed
