"""The daemon and Python's cycle collector: freeze what start-up made, time the pauses.

A collection holds the GIL: while it runs no runtime moves a call. A full
(generation-2) collection walks every tracked object, and nearly all of the
daemon's are made at start-up and live for good (modules, classes, functions,
the config, bindings: ~30 000). Walking them took 8-20 ms under load, several
times a second, and was the longest gap between completions under steady load.
:func:`freeze_startup_objects` moves them out of the collector's reach
(``gc.freeze()``); what is made later is collected as usual.

:class:`GcWatch` times every collection (two clock reads each, from
``gc.callbacks``) so ``mrpcctl status`` shows what the collector costs.
"""

from __future__ import annotations

import gc
import time
from typing import Any


def freeze_startup_objects() -> None:
    """Collect once, then freeze whatever survives; starts :data:`WATCH`.

    Call it before any app's state exists (``mrpcd run`` before the daemon starts,
    a hot restart's new process before it restores the apps): frozen objects are
    still freed by reference counting, but never by the collector, so an app's
    cyclic state frozen here would outlive the app. A hot restart's new process
    unfreezes everything first (``mrpcd/oldworld.py``)."""
    WATCH.install()
    gc.collect()
    gc.freeze()


class GcWatch:
    """Collections per generation, their total and longest pause, in ms."""

    def __init__(self) -> None:
        self._started = 0.0
        self.count = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.longest_ms = [0.0, 0.0, 0.0]

    def install(self) -> None:
        """Start timing; drops the callback of an older generation of this module (a
        hot restart's new process is a fork of the old one and inherits its list)."""
        for cb in list(gc.callbacks):
            if getattr(cb, "__module__", None) == __name__ and cb != self._callback:
                gc.callbacks.remove(cb)
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Runs with the GIL held by the collecting thread: no other thread is in here.
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1e3
        g = int(info.get("generation", 2))
        self.count[g] += 1
        self.total_ms[g] += ms
        self.longest_ms[g] = max(self.longest_ms[g], ms)

    def stats(self) -> dict[str, Any]:
        """For ``mrpcctl status``: per generation 0, 1, 2."""
        return {
            "frozen_objects": gc.get_freeze_count(),
            "collections": list(self.count),
            "total_ms": [round(x, 3) for x in self.total_ms],
            "longest_ms": [round(x, 3) for x in self.longest_ms],
        }


#: the daemon's watch (``mrpcctl status`` shows it)
WATCH = GcWatch()
