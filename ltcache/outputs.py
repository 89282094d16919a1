"""Writing outputs safely: every file the tool writes goes through here.

* :func:`atomic_write` writes to a temporary name in the same folder, flushes and fsyncs it,
  then renames it over the final name; a failed write removes its temporary file, so a final
  name only ever holds a complete file (the previous one, or the new one).
* OS errors (a full disk, no permission, a read-only file system) become one-line
  :class:`~ltcache.errors.LtcacheError` messages naming the file and, for a full disk, the free
  space there (:func:`ltcache.errors.os_error`).
* :func:`check_output_file` / :func:`check_output_dir` check an output path *before* any work
  starts: the right kind of path, a writable parent, and no existing output replaced without
  ``force``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ltcache.errors import LtcacheError, os_error
from ltcache.lock import OutputLock, held_by_another

PathLike = Union[str, Path]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(tmp: str, final: Path) -> None:
    """Give the temporary file the mode a plain ``open()`` would (mkstemp makes it 0600), or
    the mode of the file it replaces."""
    try:
        mode = final.stat().st_mode & 0o777 if final.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
    except OSError:
        pass


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[str]:
    """A temporary name beside ``path``; when the block succeeds the file is fsynced, given the
    usual mode and renamed over ``path``; when it fails the temporary file is removed. OS errors
    become one-line LtcacheErrors."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _usual_mode(tmp, path)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise os_error(exc, path) from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", **open_kw) -> Iterator:
    """``with atomic_write(p) as fh: fh.write(...)`` -- the file appears under ``p`` complete or
    not at all. ``mode`` is "w" (text) or "wb" (binary). OS errors become LtcacheError."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_write writes whole files: mode must be 'w' or 'wb'")
    with _staged(Path(path)) as tmp, open(tmp, mode, **open_kw) as fh:
        yield fh


def atomic_save(path: PathLike, save: Callable[[str], None]) -> Path:
    """Run ``save(tmp_name)`` (e.g. ``lambda p: torch.save(obj, p)``) on a temporary name in the
    same folder, then rename it to ``path``; the temporary file never outlives a failure."""
    path = Path(path)
    with _staged(path) as tmp:
        try:
            save(tmp)
        except RuntimeError as exc:     # torch.save wraps a failed write (e.g. ENOSPC) in RuntimeError
            err = _torch_write_error(exc, path)
            if err is None:
                raise
            raise err from None
    return path


def save_torch(obj, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically: complete under ``path`` or not there, and a failed
    write (a full disk, which torch reports as ``RuntimeError: [enforce fail at
    inline_container.cc:...] unexpected pos ...``) is the one-line disk-full LtcacheError."""
    import torch
    return atomic_save(path, lambda tmp: torch.save(obj, tmp))


# torch's zip writer (PytorchStreamWriter) reports a short or failed write as a RuntimeError:
# "unexpected pos N vs M" (a short write: the disk filled up), "file write failed", "errno = 28"
_TORCH_WRITE = ("unexpected pos", "write failed", "failed writing", "file write", "enforce fail")


def _torch_write_error(exc: RuntimeError, path: Path) -> Optional[OSError]:
    """The OSError behind a RuntimeError raised by a library writer (torch.save), or None when
    the RuntimeError is not about writing the file."""
    text = str(exc)
    low = text.lower()
    found = re.search(r"errno\s*[=:]?\s*(\d+)", low)
    if found:
        return OSError(int(found.group(1)), os.strerror(int(found.group(1))))
    if not any(k in low for k in _TORCH_WRITE):
        return None
    if "unexpected pos" in low or _full(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, (text.strip().splitlines() or [''])[0][:200])


def write_text(path: PathLike, text: str) -> Path:
    """Atomically write a text file."""
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return Path(path)


def check_output_file(path: PathLike, force: bool = False, what: str = "output file",
                      flag: str = "--force") -> Path:
    """Before any work: ``path`` may be written as a file (not a folder, parent creatable and
    writable, not an existing file unless ``force``)."""
    path = Path(path)
    if path.is_dir():
        raise LtcacheError(f"{what} {path} is a folder; give a file name, e.g. {path / 'out'}")
    if path.exists() and not force:
        raise LtcacheError(f"{what} {path} already exists; pass {flag} to replace it or choose another name")
    _check_parent(path.parent, what)
    return path


def check_output_dir(path: PathLike, force: bool = False, what: str = "output folder",
                     outputs: tuple = (), flag: str = "--force") -> Path:
    """Before any work: ``path`` may be used as an output folder (not a file; when it holds any
    of ``outputs`` already, refused unless ``force``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LtcacheError(f"{what} {path} is a file; give a folder name")
    if path.is_dir() and not force:
        found = [n for n in outputs if (path / n).exists()]
        if found:
            raise LtcacheError(f"{what} {path} already holds {', '.join(found)}; pass {flag} to replace "
                               "them or choose another folder")
    _check_parent(path if path.is_dir() else path.parent, what)
    return path


def _check_parent(parent: Path, what: str) -> None:
    p = parent.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise LtcacheError(f"cannot create the {what}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise LtcacheError(f"cannot write the {what} under {p} (no permission); choose another place")


def _full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent if path.parent.exists() else ".").free < (1 << 20)
    except OSError:
        return False


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def aside_name(final: PathLike) -> Path:
    """Where a replace-by-rename keeps the previous ``final`` between its two renames."""
    final = Path(final)
    return final.with_name(f".{final.name}.old")


def restore_interrupted_swap(final: PathLike) -> bool:
    """Finish the story of a replacement that was killed between its two renames (``final`` moved
    aside to ``.NAME.old``, the new one not yet renamed in): ``final`` is missing and ``.NAME.old``
    holds the previous output, so it is put back under its name (a one-line note on stderr). Nothing
    happens while another live process holds the lock of that replacement. True when restored."""
    import sys
    final = Path(final)
    old = aside_name(final)
    if final.exists() or final.is_symlink() or not old.is_dir():
        return False
    if held_by_another(final.with_name(f".{final.name}.lock")) or held_by_another(old / ".lock"):
        return False                     # a replacement is under way right now
    try:
        os.replace(old, final)
    except OSError:
        return False
    print(f"note: {final} was being replaced when that run was stopped; its previous contents were put "
          f"back from {old.name}", file=sys.stderr)
    return True


@contextlib.contextmanager
def output_lock(path: PathLike, folder: bool = True) -> Iterator[Path]:
    """Hold a lock on an output while a run writes it: ``path/.lock`` for a folder, or
    ``.<name>.lock`` next to a file (``folder=False``). A second run writing the same output is
    refused with the first one's pid (the lock of a process that is gone is taken over). A
    folder this call created is removed again when it is still empty at the end."""
    path = Path(path)
    where = path if folder else path.parent
    created = not where.exists()
    lock = OutputLock(where)
    if not folder:
        lock.path = where / f".{path.name}.lock"
    try:
        lock.acquire()
    except OSError as exc:
        raise os_error(exc, lock.path) from None
    except LtcacheError as exc:
        if folder:
            raise
        raise LtcacheError(str(exc).replace(f"{where} is being written", f"{path} is being written", 1)) from None
    try:
        yield path
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                where.rmdir()            # only succeeds when nothing was written there
