"""One writer per cache directory: a lock file with the writer's pid and host; the lock of
a process that no longer runs (on this host) is stale and taken over."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ltcache.errors import LtcacheError

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheLock:
    """Context manager holding ``DIR/.lock`` for the duration of a write."""

    def __init__(self, cache_dir):
        self.path = Path(cache_dir) / LOCK

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                pid, host = int(other.get("pid", -1)), other.get("host")
                if host == me["host"] and pid > 0 and not _alive(pid):
                    self.path.unlink(missing_ok=True)        # stale: its writer is gone
                    continue
                raise LtcacheError(f"{self.path.parent} is being written by another process (pid {pid} on {host}); "
                                   f"wait for it, or delete {self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return
        raise LtcacheError(f"could not take the lock {self.path}; delete it if no extraction is running")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
