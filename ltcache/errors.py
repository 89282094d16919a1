"""User-facing errors: one line that names the problem and the fix, exit code 2 (:func:`os_error`
turns an OS error while writing a file into one)."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional, Union


class LtcacheError(Exception):
    """A problem with the user's input or files (not a bug).

    The CLI prints ``error: <message>`` on one line, exits with code 2 and shows no
    traceback. Messages should name the problem and say how to fix it.
    """

    exit_code = 2


def close_matches(word: str, choices, n: int = 3, cutoff: float = 0.6) -> list:
    """The ``choices`` closest to ``word`` for a "did you mean" hint, ignoring case (``LOS`` -> ``los``);
    an exact match but for case comes first."""
    import difflib
    by_lower: dict = {}
    for c in choices:
        by_lower.setdefault(str(c).lower(), []).append(c)
    low = str(word).lower()
    exact = [c for c in by_lower.get(low, []) if c != word]
    close = difflib.get_close_matches(low, list(by_lower), n=n, cutoff=cutoff)
    found = exact + [c for k in close for c in by_lower[k] if c not in exact and c != word]
    return found[:n]


def _free_space(path: Path) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"  # pragma: no cover


def os_error(exc: OSError, path: Union[str, Path], needed: Optional[int] = None) -> LtcacheError:
    """A one-line LtcacheError for an OS error while writing ``path``."""
    path = Path(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"; about {needed / 2**20:.1f} MB is needed" if needed else ""
        return LtcacheError(f"no space left on the device while writing {path} "
                            f"({_free_space(path.parent)} free there{need}); free some space or write "
                            "elsewhere, then run the command again (nothing was left half-written)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LtcacheError(f"cannot write {path} ({exc.strerror}); choose a folder you can write to")
    return LtcacheError(f"cannot write {path} ({exc.strerror or exc}); check the path and the disk")
