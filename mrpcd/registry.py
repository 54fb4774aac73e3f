"""Loading engines by module path, validated when loaded (fail early, clearly)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

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
