"""Hot restart: the new process lets go of the old daemon it was forked from.

How this works: the new process is a fork of the old one, so it starts with a
copy of everything the old daemon had: the old generation's modules (the new
process imports its own) and the old ``Daemon`` with all it holds. Of these
only the mappings of the apps' regions (``mmap`` objects) are used again
(:func:`keep`); the rest must go, or every hot restart adds a generation of
modules and objects to the process (~4 MB each), forever.

Dropping our references is not enough: a fork keeps only the thread that
forked, and CPython frees the other threads' states without releasing what
their frames held, so whatever the old runtime, control and main threads
referenced stays alive for good; so do the forking thread's own old frames
below ``_child`` (they never run again, but they stay on the stack). So
:func:`release` *empties* the old world instead: every instance of a class of
an old mrpc module loses its attributes, every old class its methods, every
old module its globals, every thread object of the old process its target.
What stays are empty shells (a few KB a generation); one collection frees the
rest.

Finalizers run as the objects go: sockets and mmaps close their descriptors.
Those are the copies the fork made (the old process keeps its own, so no
connection notices), and :func:`release` runs before the new process receives
or opens any descriptor, so no number the new code uses is closed; the caller
then lists the inherited descriptors still open. No old code runs afterwards:
its threads did not survive the fork, and the forking thread's old frames only
return into ``os._exit``.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from types import ModuleType, SimpleNamespace
from typing import Any

log = logging.getLogger(__name__)

#: the packages a hot restart imports anew (``mrpcd.hotrestart._child`` drops them)
PACKAGES = ("mrpcd", "engines", "libmrpc", "policies")
#: class attributes a class keeps when it is emptied
_CLASS_KEEPS = frozenset(
    {"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "__slots__"}
)


def is_old_module(name: str, module: Any) -> bool:
    """A module of the old generation: an mrpc package module (or an engine loaded
    fresh by an upgrade) that the new process does not use."""
    if not isinstance(module, ModuleType) or sys.modules.get(name) is module:
        return False
    return name.split(".")[0] in PACKAGES or "__mrpc_v" in name


def keep(old_daemon: Any) -> Any:
    """What the new process takes from the old daemon, as a stand-in with the same
    shape (``apps[app_id].regions`` and ``.schema_texts``): each app's region
    mappings and layout, the schema texts. Nothing of the old code's classes."""
    from libmrpc._shm import ShmLayout

    apps = {}
    for app_id, app in list(old_daemon.apps.items()):
        regions = app.regions
        apps[app_id] = SimpleNamespace(
            regions=SimpleNamespace(
                layout=ShmLayout(**regions.layout.to_dict()),
                ctl=regions.ctl,
                send=regions.send,
                recv=regions.recv,
            ),
            schema_texts=[list(t) if isinstance(t, list) else t for t in app.schema_texts],
        )
    return SimpleNamespace(apps=apps)


def release(old_world: tuple[Any, dict[str, Any]]) -> dict[str, float]:
    """Empty the old world (see the module doc); returns what was done, for the log.
    Call before any descriptor is received or opened, once :func:`keep` has run."""
    t0 = time.monotonic()
    gc.unfreeze()  # the start-up freeze (mrpcd/gcwatch.py) hid the old objects: show them
    for name in [n for n in sys.modules if "__mrpc_v" in n]:  # engines an upgrade loaded
        old_world[1].setdefault(name, sys.modules.pop(name))  # (from a file, say): loaded again
    modules = {n: m for n, m in old_world[1].items() if is_old_module(n, m)}
    gc.callbacks[:] = [  # an old module's collector hook would run emptied code
        cb
        for cb in gc.callbacks
        if str(getattr(cb, "__module__", "")).split(".")[0] not in PACKAGES
    ]
    classes = _classes(modules.values())
    _fix_logging(classes)
    instances = 0
    current = threading.current_thread()
    for obj in gc.get_objects():
        if isinstance(obj, threading.Thread):
            if obj is not current:
                _forget_thread(obj)
        elif type(obj) in classes:
            _empty_instance(obj)
            instances += 1
    for cls in classes:
        _empty_class(cls)
    hotrestart = modules.get("mrpcd.hotrestart")
    for module in modules.values():
        module.__dict__.clear()
    if hotrestart is not None:  # its _fork frame calls os._exit when the new daemon stops
        import os
        import traceback

        hotrestart.__dict__.update(os=os, traceback=traceback)
    old_world[1].clear()
    freed = gc.collect()
    return {
        "modules": len(modules),
        "classes": len(classes),
        "instances": instances,
        "freed": freed,
        "ms": round((time.monotonic() - t0) * 1e3, 1),
    }


def _classes(modules: Any) -> set[type]:
    """Every class defined in ``modules`` (nested classes included)."""
    found: set[type] = set()

    def add(ns: dict[str, Any], name: str) -> None:
        for value in list(ns.values()):
            if isinstance(value, type) and value.__module__ == name and value not in found:
                found.add(value)
                add(dict(vars(value)), name)

    for module in modules:
        add(dict(vars(module)), module.__name__)
    return found


def _fix_logging(classes: set[type]) -> None:
    """The root logger's handlers were set up by the old code: a formatter of an old
    class (``mrpcd.logs.JournalFormatter``) is replaced by the new code's."""
    from mrpcd.logs import JournalFormatter

    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if formatter is not None and type(formatter) in classes:
            handler.setFormatter(JournalFormatter())
        for f in list(handler.filters):
            if type(f) in classes:
                handler.removeFilter(f)


def _forget_thread(thread: threading.Thread) -> None:
    """A thread of the old process (stopped by the fork): drop what it was to run.
    Its own attributes stay (``threading``'s fork handling resets them)."""
    for name in ("_target", "_args", "_kwargs"):
        thread.__dict__.pop(name, None)
    threading._dangling.discard(thread)  # type: ignore[attr-defined]


def _empty_instance(obj: Any) -> None:
    try:
        d = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        pass
    else:
        if isinstance(d, dict):
            d.clear()
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            try:
                object.__delattr__(obj, slot)
            except (AttributeError, TypeError):
                pass


def _empty_class(cls: type) -> None:
    for name in list(cls.__dict__):
        if name in _CLASS_KEEPS:
            continue
        try:
            type.__delattr__(cls, name)
        except (AttributeError, TypeError):
            pass  # an enum's members, say: they stay (small)
