"""Loading engines by module path, validated when loaded (fail early, clearly)."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from collections.abc import Mapping
from pathlib import Path

from libmrpc.status import LocalError
from mrpcd.engine import Engine, validate_engine_class


class EngineLoadError(LocalError):
    """An engine module is missing or does not implement the engine contract.

    A local misuse (the configured module path or the engine's code is wrong);
    the message names the engine, its module and what is missing."""


class EngineRegistry:
    def __init__(self, modules: Mapping[str, str]) -> None:
        self.modules = dict(modules)
        self._classes: dict[str, type[Engine]] = {}

    def names(self) -> list[str]:
        return sorted(self.modules)

    def get(self, name: str, *, reload: bool = False) -> type[Engine]:
        """The engine class registered as ``name`` (importing its module if needed)."""
        if name in self._classes and not reload:
            return self._classes[name]
        path = self.modules.get(name)
        if path is None:
            raise EngineLoadError(
                f"no engine named {name!r}; known engines: {', '.join(self.names())}"
            )
        self._classes[name] = cls = load_engine_class(path, name=name, reload=reload)
        return cls


def load_engine_class(
    path: str, *, name: str = "", reload: bool = False, attr: str = "ENGINE"
) -> type[Engine]:
    where = f"engine {name or path!r} (module {path})"
    try:
        module = importlib.import_module(path)
        if reload:
            module = importlib.reload(module)
    except Exception as e:
        raise EngineLoadError(f"{where}: cannot import: {type(e).__name__}: {e}") from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise EngineLoadError(f"{where}: module defines no {attr} (expected `{attr} = MyEngine`)")
    try:
        return validate_engine_class(obj, where)
    except TypeError as e:
        raise EngineLoadError(str(e)) from None


_fresh = itertools.count(1)


def load_fresh_engine_class(
    *, module: str | None = None, file: str | None = None, attr: str = "ENGINE"
) -> type[Engine]:
    """Load engine code anew for a live upgrade: a new module object every time,
    never the class cached by an earlier import (``importlib.reload`` would change
    the module the running engines use). ``module`` is a dotted path found on
    ``sys.path``; ``file`` a ``.py`` path. Raises ``EngineLoadError`` naming the gap."""
    if (module is None) == (file is None):
        raise EngineLoadError("name the new code with exactly one of --module and --file")
    where = f"module {module}" if module else f"file {file}"
    if module is not None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:
            raise EngineLoadError(f"{where}: cannot be found: {e}") from None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise EngineLoadError(f"{where}: not found as a .py file on the daemon's path")
        path = spec.origin
    else:
        path = str(Path(str(file)).resolve())
        if not Path(path).is_file():
            raise EngineLoadError(f"{where}: no such file")
    unique = f"mrpc_upgrade_{next(_fresh)}_{Path(path).stem}"
    fresh_spec = importlib.util.spec_from_file_location(unique, path)
    if fresh_spec is None or fresh_spec.loader is None:
        raise EngineLoadError(f"{where}: cannot be loaded")
    mod = importlib.util.module_from_spec(fresh_spec)
    sys.modules[unique] = mod  # dataclasses and pickling look modules up by name
    try:
        fresh_spec.loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(unique, None)
        raise EngineLoadError(f"{where}: cannot import: {type(e).__name__}: {e}") from e
    obj = getattr(mod, attr, None)
    if obj is None:
        sys.modules.pop(unique, None)
        raise EngineLoadError(f"{where}: defines no {attr} (expected `{attr} = MyEngine`)")
    try:
        cls = validate_engine_class(obj, where)
    except TypeError as e:
        sys.modules.pop(unique, None)
        raise EngineLoadError(str(e)) from None
    cls.__mrpc_source__ = module or path  # type: ignore[attr-defined]  # shown by `mrpcctl list`
    return cls
