"""Loading engines by module path, validated when loaded (fail early, clearly)."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

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

    def set_class(self, name: str, cls: type[Engine]) -> type[Engine] | None:
        """Use ``cls`` for ``name`` from now on (an upgrade of every app); returns the
        class it replaces (None if ``name`` was never loaded)."""
        old = self._classes.get(name)
        self._classes[name] = cls
        return old


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


# --------------------------------------------------------------------------- fresh loads

#: what a freshly loaded module was loaded from (a dotted module path or a file path)
SOURCE_ATTR = "__mrpc_source__"
_fresh = itertools.count(1)


def engine_source(cls: type) -> str:
    """Where ``cls`` was loaded from: its module path, or the file of a fresh load."""
    module = sys.modules.get(cls.__module__)
    return str(getattr(module, SOURCE_ATTR, cls.__module__))


def _check_file(path: Path) -> None:
    """Code the daemon runs must be as trusted as the daemon: a regular file owned by
    root or the daemon's user, writable by nobody else."""
    try:
        st = path.stat()
    except OSError as e:
        raise EngineLoadError(f"engine file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise EngineLoadError(f"engine file {path} is not a regular file")
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EngineLoadError(
            f"engine file {path} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}) "
            f"may be changed by others: it must belong to root or uid {os.geteuid()} and "
            f"be writable only by its owner (chmod go-w)"
        )


def load_fresh_engine_class(
    *, module: str | None = None, file: str | None = None, attr: str = "ENGINE"
) -> tuple[type[Engine], str]:
    """Load the engine class of a module path or a ``.py`` file as a *new* module
    object (never one cached in ``sys.modules``: an upgrade always runs the code as
    it is now), validated as at load. Returns the class and where it came from."""
    if (module is None) == (file is None):
        raise EngineLoadError("name the new code: a module path or a file path (one of them)")
    if module is not None:
        source = module
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:
            raise EngineLoadError(f"module {module}: cannot find it: {e}") from None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise EngineLoadError(
                f"module {module}: no such Python source module on mrpcd's path "
                f"(give its dotted path, e.g. engines.ratelimit, or --file PATH.py)"
            )
        path = Path(spec.origin)
        name = f"{module}__mrpc_v{next(_fresh)}"
    else:
        assert file is not None
        path = Path(file)
        source = str(path)
        if not path.is_absolute() or path.suffix != ".py":
            raise EngineLoadError(f"engine file {file!r}: expected an absolute path to a .py file")
        name = f"mrpc_engine_{path.stem}__mrpc_v{next(_fresh)}"
    _check_file(path)
    where = f"engine code {source}"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        mod: ModuleType = importlib.util.module_from_spec(spec)
        setattr(mod, SOURCE_ATTR, source)
        sys.modules[name] = mod  # under its own new name: dataclasses and tracebacks find it
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    except (Exception, SystemExit) as e:
        raise EngineLoadError(f"{where}: cannot import: {type(e).__name__}: {e}") from e
    obj = getattr(mod, attr, None)
    if obj is None:
        raise EngineLoadError(f"{where}: module defines no {attr} (expected `{attr} = MyEngine`)")
    try:
        return validate_engine_class(obj, where), source
    except TypeError as e:
        raise EngineLoadError(str(e)) from None
