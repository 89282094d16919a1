"""One registry for every kind of named entry: methods, losses, loss forms and terms, heads,
samplers, post-hoc rules and backbones.

Each kind is a :class:`Registry` (a ``dict`` name -> entry) with the same rules:

* **register**: a name is a non-empty string without spaces or commas, and is refused when
  it exists in any letter case (``Focal`` next to ``focal`` would make ``--methods`` depend on
  how a user types it); the entry's *origin* is recorded: ``built-in``, ``plugin FILE`` while
  a plugin file is being imported (:func:`loading`), else the file that registered it.
* **get**: an unknown name is a one-line error with the closest names (case-insensitive).
* **snapshot**: :func:`snapshot` captures every registry at once (and any container added
  with :func:`track`), so a failed plugin import or a test's registrations can be undone.

This module sits on the ground floor: it imports nothing of ltcache but the error type, and
the registries' owners (``stage2.methods``, ``stage2.losses``, ``stage2.heads``, ...) import it.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import sys
from typing import Any, Callable, Iterator, Optional

from ltcache.errors import LtcacheError

_MISSING = object()
_ALL: list["Registry"] = []
_TRACKED: list[Any] = []               # other containers snapshot() restores (dicts, lists)
_loading: list[str] = []               # plugin files being imported (innermost last)


# --------------------------------------------------------------------------------------------
# where a registration comes from
# --------------------------------------------------------------------------------------------

def current_plugin() -> Optional[str]:
    """The plugin file being imported right now (its registrations record it as their origin)."""
    return _loading[-1] if _loading else None


@contextlib.contextmanager
def loading(path: str) -> Iterator[None]:
    """Registrations inside the block come from plugin file ``path``."""
    _loading.append(str(path))
    try:
        yield
    finally:
        _loading.pop()


def origin_of(obj: Any = None, depth: int = 2) -> str:
    """``plugin FILE`` while a plugin loads; else ``built-in`` for ltcache's own code, or the
    file that defined ``obj`` (or, without ``obj``, the caller ``depth`` frames up)."""
    if _loading:
        return f"plugin {_loading[-1]}"
    if obj is not None:
        module = str(getattr(obj, "__module__", "") or "")
        if module == "ltcache" or module.startswith("ltcache."):
            return "built-in"
        try:
            return inspect.getsourcefile(obj) or module or "?"
        except TypeError:
            return module or "?"
    frame = sys._getframe(depth)
    module = str(frame.f_globals.get("__name__", ""))
    return "built-in" if module == "ltcache" or module.startswith("ltcache.") else frame.f_code.co_filename


def check_name(name: Any, kind: str) -> str:
    """``name`` if it is a usable entry name (non-empty, no spaces or commas), else LtcacheError."""
    if not isinstance(name, str) or not name or any(ch.isspace() or ch == "," for ch in name):
        raise LtcacheError(f"{kind} name {name!r} must be a non-empty string without spaces or commas")
    return name


# --------------------------------------------------------------------------------------------
# a registry
# --------------------------------------------------------------------------------------------

class Registry(dict):
    """name -> entry of one ``kind`` (e.g. "method"), with one duplicate rule, one error
    format and the origin of each entry. Reads as a plain dict (``in``, ``[]``, iteration in
    registration order); write through :meth:`register`."""

    def __init__(self, kind: str, hint: str = ""):
        super().__init__()
        self.kind = kind
        self.hint = hint                       # how to add or list entries, for the unknown-name error
        self._origins: dict[str, str] = {}
        _ALL.append(self)

    def register(self, name: str, entry: Any, origin: Optional[str] = None, taken: tuple = ()) -> Any:
        """Add ``entry`` under ``name``; refused when the name exists here (any letter case) or
        in ``taken`` (names this kind shares a namespace with)."""
        self.check_free(name, taken)
        self[name] = entry
        self._origins[name] = origin or origin_of(entry if not isinstance(entry, (str, int, float)) else None, 2)
        return entry

    def check_free(self, name: str, taken: tuple = ()) -> str:
        """``name`` if it may be registered (the one duplicate rule), else the one-line error."""
        check_name(name, self.kind)
        clash = self.clash(name)
        if clash is not None:
            raise LtcacheError(f"{self.kind} '{name}' is already registered"
                               f"{'' if clash == name else f' as {clash!r}'} ({self._origins.get(clash, 'built-in')}); "
                               "choose another name")
        if name in taken:
            raise LtcacheError(f"{self.kind} name '{name}' is taken; choose another name")
        return name

    def clash(self, name: str) -> Optional[str]:
        """The registered name equal to ``name`` in any letter case, or None."""
        if name in self:
            return name
        low = name.lower()
        return next((n for n in self if n.lower() == low), None)

    def get(self, name: str, default: Any = _MISSING) -> Any:
        """The entry ``name``; with ``default``, as ``dict.get``; without, an unknown name is a
        one-line LtcacheError naming the closest entries."""
        if name in self:
            return self[name]
        if default is not _MISSING:
            return default
        raise LtcacheError(self.unknown(name))

    def unknown(self, name: Any) -> str:
        """The one-line message for an unknown ``name``: did-you-mean (case-insensitive), the
        registered names and how to add one."""
        names = list(self)
        lowered = {n.lower(): n for n in names}
        close = [lowered[c] for c in difflib.get_close_matches(str(name).lower(), list(lowered), n=3, cutoff=0.5)]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        listed = ", ".join(names) if len(names) <= 12 else f"{len(names)} of them"
        return f"unknown {self.kind} '{name}'{hint} (registered: {listed}{'; ' + self.hint if self.hint else ''})"

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self)

    def origin(self, name: str) -> str:
        """Where ``name`` was registered: built-in, plugin FILE, or a file."""
        self.get(name)
        return self._origins.get(name, "built-in")

    def index(self, name: str) -> int:
        """Position of ``name`` in registration order."""
        return list(self).index(name)

    def from_plugins(self) -> list[str]:
        """Names registered by plugin files."""
        return [n for n in self if self._origins.get(n, "").startswith("plugin ")]

    def _state(self) -> tuple:
        return dict(self), dict(self._origins)

    def _restore(self, state: tuple) -> None:
        entries, origins = state
        self.clear()
        self.update(entries)
        self._origins.clear()
        self._origins.update(origins)


def track(container: Any) -> Any:
    """Have :func:`snapshot` restore ``container`` (a dict or list) too."""
    _TRACKED.append(container)
    return container


def registries() -> dict[str, Registry]:
    """Every registry, by kind."""
    return {r.kind: r for r in _ALL}


def snapshot() -> Callable[[], None]:
    """A function that puts every registry (and tracked container) back as it is now."""
    regs = [(r, r._state()) for r in _ALL]
    other = [(c, dict(c) if isinstance(c, dict) else list(c)) for c in _TRACKED]

    def restore() -> None:
        for r, state in regs:
            r._restore(state)
        for c, saved in other:
            c.clear()
            c.update(saved) if isinstance(c, dict) else c.extend(saved)

    return restore


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Undo every registration (and plugin load) made inside the block (tests, notebooks)."""
    restore = snapshot()
    try:
        yield
    finally:
        restore()
