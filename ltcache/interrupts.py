"""Stops from outside -- Ctrl-C (SIGINT) and SIGTERM (``kill``, ``timeout``, a batch scheduler,
torchrun stopping the other ranks when one failed) -- end a command the same way: the exception
unwinds through every writer (temporary files removed, locks released), then one line says what was
kept and what the same command will do next.

A command states what an interruption keeps with :func:`keeps` around the part of its work that the
statement is true for; the innermost statement wins.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, Optional, Union

_NOTES: list = []
OWNED = False          # True in the ``ltcache`` process itself (not when a program calls the CLI in-process)
DEFAULT_NOTE = "nothing was written; the same command starts over"


class Stopped(KeyboardInterrupt):
    """SIGTERM as an exception: a KeyboardInterrupt, so that every clean-up written for Ctrl-C runs.
    ``note``: what was kept, as stated where the signal arrived (the statement is gone once the
    exception has unwound past it)."""

    def __init__(self, signum: int = signal.SIGTERM, note: Optional[str] = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.note = note


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept where it arrived (see :class:`Stopped`)."""

    def __init__(self, note: Optional[str] = None):
        super().__init__("SIGINT")
        self.note = note


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum, current_note())


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(current_note())


def install() -> None:
    """In the ``ltcache`` process itself: SIGTERM raises :class:`Stopped` and Ctrl-C
    :class:`Interrupted` in the main thread (nothing when called from another thread, or when a
    program runs the CLI in its own process: its signals stay its own)."""
    if OWNED and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _raise_interrupted)


@contextlib.contextmanager
def keeps(note: Union[str, Callable[[], str]]) -> Iterator[None]:
    """While the block runs, an interruption reports ``note`` (what is kept; what the same command
    does next), e.g. ``"the completed shards are kept; the same command resumes from them"``; a
    callable is asked at the interruption (when what is kept changes as the work goes on)."""
    _NOTES.append(note)
    try:
        yield
    finally:
        _NOTES.pop()


def current_note() -> str:
    """What an interruption now keeps (the innermost :func:`keeps`, or that nothing was written)."""
    if not _NOTES:
        return DEFAULT_NOTE
    note = _NOTES[-1]
    return note() if callable(note) else note


def ending() -> None:
    """The command has said its last line: a SIGTERM now (torchrun stopping the ranks) must not add
    a traceback to it, so it is ignored while the process exits."""
    if OWNED and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def signal_name(exc: BaseException) -> str:
    """``SIGTERM`` for :class:`Stopped`, ``Ctrl-C`` for a plain KeyboardInterrupt."""
    return "SIGTERM" if isinstance(exc, Stopped) else "Ctrl-C"


def exit_code(exc: BaseException) -> int:
    """128 + the signal number, as a shell reports a process ended by that signal (143, 130)."""
    return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)


def message(exc: BaseException, note: Optional[str] = None) -> str:
    """The one line for an interruption: ``stopped by SIGTERM: <what was kept and what comes next>``."""
    return f"{'stopped by SIGTERM' if isinstance(exc, Stopped) else 'interrupted (Ctrl-C)'}: {note or current_note()}"


def test_point(name: str) -> None:
    """Tests only: ``LTCACHE_TEST_SIGTERM=NAME`` sends this process SIGTERM when it reaches the point
    ``NAME`` (e.g. ``sweep``, ``stage-b``, ``shard``, ``epoch``), as ``kill PID`` would there -- a stop
    at a known place, with no race against the work."""
    import os
    if os.environ.get("LTCACHE_TEST_SIGTERM") == name:
        os.environ.pop("LTCACHE_TEST_SIGTERM")
        os.kill(os.getpid(), signal.SIGTERM)
