"""Running a command in-process and checking its outcome: shared by the fault tests."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from ltcache.cli import cli


def run(*args):
    """(exit code, stdout and stderr, stderr) of one command."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output, res.stderr


def one_error(code, out, err, *needles):
    """Exit 2 and exactly one line ``error: ...`` on stderr holding every needle, no traceback."""
    assert code == 2, out
    assert "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def files_in(folder: Path) -> set:
    return {p.name for p in Path(folder).iterdir()}
