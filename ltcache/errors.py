"""User-facing errors: one line that names the problem and the fix, exit code 2."""
from __future__ import annotations


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
