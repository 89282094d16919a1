"""A replacement by rename (``import --force``, ``extract --force``: the old folder moved aside to
``.NAME.old``, the new one renamed in) killed between its two renames: the next command puts the
previous cache back under its name, so nothing is lost and ``info`` finds it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from ltcache.cache.importer import import_features
from ltcache.cache.manifest import MANIFEST
from ltcache.cli import cli

ROOT = Path(__file__).resolve().parents[1]

# run in a child process: the second rename (the new folder onto the final name) is a kill -9
KILL_AT_SECOND_RENAME = """
import os, sys
real = os.replace
def replace(src, dst, *a, **k):
    if str(src).endswith('.new'):
        os._exit(9)
    return real(src, dst, *a, **k)
os.replace = replace
"""


def _feats(path: Path, seed: int) -> Path:
    g = np.random.default_rng(seed)
    np.savez(path, train_features=g.standard_normal((12, 4), dtype=np.float32), train_labels=np.arange(12) % 3,
             test_features=g.standard_normal((6, 4), dtype=np.float32), test_labels=np.arange(6) % 3)
    return path


def _child(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", KILL_AT_SECOND_RENAME + textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=120)


def _killed_between_renames(out: Path, code: str) -> bytes:
    before = (out / MANIFEST).read_bytes()
    res = _child(code)
    assert res.returncode == 9, res.stderr
    assert not out.exists() and (out.parent / f".{out.name}.old" / MANIFEST).read_bytes() == before
    return before


def test_import_force_killed_between_renames_is_restored_by_info(tmp_path):
    out = tmp_path / "cache"
    import_features(_feats(tmp_path / "a.npz", 0), out)
    before = _killed_between_renames(out, f"""
        from ltcache.cache.importer import import_features
        import_features({str(_feats(tmp_path / "b.npz", 1))!r}, {str(out)!r}, force=True)""")
    res = CliRunner().invoke(cli, ["info", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{out} was being replaced" in res.stderr and ".cache.old" in res.stderr
    assert (out / MANIFEST).read_bytes() == before and not (tmp_path / ".cache.old").exists()
    # the same import, now without --force, is refused: the restored cache is not replaced silently
    res = CliRunner().invoke(cli, ["import", str(tmp_path / "b.npz"), "--out", str(out)])
    assert res.exit_code == 2 and "already holds a cache" in res.stderr
    assert (out / MANIFEST).read_bytes() == before


def test_import_without_force_after_the_kill_keeps_the_old_cache(tmp_path):
    """A plain import into the name (which looks free) must not throw the hidden old cache away."""
    out = tmp_path / "cache"
    import_features(_feats(tmp_path / "a.npz", 0), out)
    before = _killed_between_renames(out, f"""
        from ltcache.cache.importer import import_features
        import_features({str(_feats(tmp_path / "b.npz", 1))!r}, {str(out)!r}, force=True)""")
    res = CliRunner().invoke(cli, ["import", str(tmp_path / "b.npz"), "--out", str(out)])
    assert res.exit_code == 2 and "already holds a cache; pass --force" in res.stderr, res.output
    assert (out / MANIFEST).read_bytes() == before
    res = CliRunner().invoke(cli, ["import", str(tmp_path / "b.npz"), "--out", str(out), "--force", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / MANIFEST).read_bytes() != before and sorted(p.name for p in tmp_path.iterdir()) == \
        ["a.npz", "b.npz", "cache"]


def test_cache_writer_force_killed_between_renames(tmp_path):
    """The extraction's writer (CacheWriter, also behind write_cache) swaps the same way."""
    code = """
        import torch
        from ltcache.cache import write_cache
        def make(path, seed, force=False):
            g = torch.Generator().manual_seed(seed)
            splits = {"train": (torch.randn(10, 1, 4, generator=g), torch.arange(10) % 2, torch.arange(10), ["clean"]),
                      "test": (torch.randn(4, 1, 4, generator=g), torch.arange(4) % 2, torch.arange(4), ["center"])}
            write_cache(path, splits, torch.randn(2, 4, generator=g), torch.randn(2, generator=g),
                        dataset={"source": "synthetic"}, class_counts=[5, 5], arch="toy", force=force)
        """
    code = textwrap.dedent(code)
    out = tmp_path / "cache"
    made: dict = {}
    exec(code, made)                                      # the first cache, made here
    made["make"](str(out), 0)
    before = _killed_between_renames(out, code + f"make({str(out)!r}, 1, force=True)\n")
    from ltcache.cache import load
    load(out, quiet=True)                                 # restored on the way in, and whole
    assert (out / MANIFEST).read_bytes() == before and not (tmp_path / ".cache.old").exists()
