"""Plugins: a user's own Python file that registers methods, losses, heads, samplers or post-hoc rules.

``ltcache retrain/bench/tune --plugin my_methods.py`` and ``plugins = ["my_methods.py"]`` under
``[pipeline]`` in a pipeline file import the file (from its path, no package needed) before the
methods are resolved, so its ``ltcache.register_loss`` / ``ltcache.register_method`` calls take
effect. A file is imported once per process; a plugin that is missing, fails to import or
registers a name that exists is a one-line error naming the file, and leaves nothing registered.
The registries themselves (and undoing registrations) are :mod:`ltcache.registry`'s.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Iterable, Optional, Union

from ltcache.errors import LtcacheError
from ltcache.registry import isolated as isolated_registry  # noqa: F401  (re-exported)
from ltcache.registry import loading, snapshot, track

_loaded: dict[Path, ModuleType] = track({})     # plugin files imported (undone with the registries)


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _where(exc: BaseException, path: Path) -> str:
    """' (line N)' of the plugin's own line that raised, if any."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f" (line {exc.lineno})"
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
    return f" (line {lines[-1]})" if lines else ""


def load_plugin(path: Union[str, Path]) -> ModuleType:
    """Import the plugin file ``path`` (once per process) and return its module."""
    given = str(path)
    p = Path(path).expanduser()
    if not p.is_file():
        raise LtcacheError(f"plugin {given} not found; give the path of a .py file that calls ltcache.register_method")
    key = p.resolve()
    if key in _loaded:
        return _loaded[key]
    stem = "".join(ch if ch.isalnum() else "_" for ch in p.stem)
    name = f"ltcache_plugin_{stem}_{hashlib.sha1(str(key).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, key)
    if spec is None or spec.loader is None:
        raise LtcacheError(f"plugin {given} cannot be imported as a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    restore = snapshot()
    sys.modules[name] = module
    try:
        with loading(given):
            spec.loader.exec_module(module)
    except LtcacheError as exc:
        restore()
        sys.modules.pop(name, None)
        raise LtcacheError(f"plugin {given}: {_one_line(exc)}") from None
    except (Exception, SystemExit) as exc:
        restore()
        sys.modules.pop(name, None)
        msg = _one_line(exc)
        raise LtcacheError(f"plugin {given} failed to import{_where(exc, key)}: {type(exc).__name__}"
                           f"{': ' + msg if msg else ''}; fix the plugin file") from None
    _loaded[key] = module
    return module


def load_plugins(paths: Iterable[Union[str, Path]], base: Optional[Path] = None) -> list[ModuleType]:
    """Import every plugin file in order (relative paths against ``base`` when given)."""
    out = []
    for path in paths or ():
        p = Path(path)
        out.append(load_plugin(base / p if base is not None and not p.is_absolute() else path))
    return out
