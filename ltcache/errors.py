"""User-facing errors: one line that names the problem and the fix, exit code 2."""
from __future__ import annotations


class LtcacheError(Exception):
    """A problem with the user's input or files (not a bug).

    The CLI prints ``error: <message>`` on one line, exits with code 2 and shows no
    traceback. Messages should name the problem and say how to fix it.
    """

    exit_code = 2
