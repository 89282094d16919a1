"""Helpers for the tests that run ltcache in several processes: the environment torchrun gives a
rank (gloo on localhost), a free port, and ranks started as plain processes so that each rank's own
exit code and stderr can be read (torchrun would stop the others and merge their output)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LTCACHE_TEST_SIGTERM",
             "LTCACHE_TEST_KILL")


def env(**extra: str) -> dict:
    """This process's environment without any rank's variables, no GPU, this checkout first on the path."""
    out = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    out.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO) + os.pathsep + out.get("PYTHONPATH", ""), **extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args_per_rank: list, cwd: Path, timeout_min: str = "1", **extra: str) -> list:
    """One ``python -m ltcache`` per entry of ``args_per_rank`` (its rank), one thread each; returns
    [(exit code, stdout, stderr)] in rank order."""
    port, n = str(free_port()), len(args_per_rank)
    procs = [subprocess.Popen([sys.executable, "-m", "ltcache", *args], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=env(WORLD_SIZE=str(n), RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port, LTCACHE_DIST_TIMEOUT=timeout_min, OMP_NUM_THREADS="1",
                                      **extra))
             for r, args in enumerate(args_per_rank)]
    return [(p.wait(timeout=300), *p.communicate()) for p in procs]
