"""One writer per output (a cache, a stage-1 run, a results file or folder): a lock file with the
writer's pid and host; the lock of a process that no longer runs (on this host) is stale and taken
over. Stage 1, the cache writers, retrain / bench / tune, predict and report take it (most through
:func:`ltcache.outputs.output_lock`)."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from ltcache.errors import LtcacheError, os_error

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held_by_another(lock_file: Path) -> bool:
    """True when ``lock_file`` names a live process (other than this one) on this host."""
    try:
        doc = json.loads(lock_file.read_text() or "{}")
        pid, host = int(doc.get("pid", -1)), doc.get("host")
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    if host != socket.gethostname():
        return True                      # another machine's writer: cannot tell, leave it alone
    return pid > 0 and pid != os.getpid() and _alive(pid)


class OutputLock:
    """Context manager holding ``DIR/.lock`` while a run writes the folder ``DIR``; a second
    writer is refused with the first one's pid. ``what`` names the work in messages."""

    def __init__(self, folder, what: str = "run"):
        self.path = Path(folder) / LOCK
        self.what = what

    def acquire(self) -> None:
        """Take the lock (creating the folder), or raise LtcacheError naming the holder."""
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, self.path.parent) from None
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
            except OSError as exc:
                raise os_error(exc, self.path) from None
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(me, fh)
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                raise os_error(exc, self.path) from None
            if "ltcache.distributed" in sys.modules:     # under torchrun: released by the survivors if killed
                sys.modules["ltcache.distributed"].announce_lock(self.path.absolute())
            return
        raise LtcacheError(f"could not take the lock {self.path}; delete it if no {self.what} is running")

    def release(self) -> None:
        """Remove the lock file (nothing when it is already gone)."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


class CacheLock(OutputLock):
    """The lock of a cache directory (one extraction or write_cache at a time)."""

    def __init__(self, cache_dir, what: str = "extraction"):
        super().__init__(cache_dir, what)
