"""Help that teaches: every command's --help shows an example; `ltcache --help` does not load torch."""
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
