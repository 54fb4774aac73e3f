"""Bench-only GC probe, loaded by every Python process ``python -m bench upgrade`` starts
(its directory is put first on their PYTHONPATH; nothing outside the bench imports it).

``MRPC_BENCH_GC_LOG=PATH``: append one line per garbage collection that took at least
``MIN_NS`` or was a full (generation-2) one to ``PATH.<pid>``:
``start_ns duration_ns generation collected thread_name`` (CLOCK_MONOTONIC, the clock of
the client's completion record), so a gap between completions can be matched with a
collection in any process. A ``gc.callbacks`` entry: two clock reads per collection.

``MRPC_BENCH_GC=no-full``: the diagnostic variant (``--daemon-gc no-full``): automatic
full collections never run in this process (``gc.set_threshold(700, 10, 10**9)``;
generations 0 and 1 as usual). ``MRPC_BENCH_GC=freeze`` (``--daemon-gc freeze``): at the
end of the process's first full collection, ``gc.freeze()``: every object alive then
(the start-up's modules, classes, functions) moves to the permanent generation, which
later collections do not scan: what a ``gc.freeze()`` after the daemon's start-up would
do (the bench runs ``mrpcctl status``, whose answer makes the daemon collect, on both
daemons before the load, so the freeze happens then). Neither is how mrpcd ships: they show the load without (or with cheaper)
full-collection pauses.
"""

import gc
import os
import threading
import time

MIN_NS = 500_000


def _install(path: str) -> None:
    # one file per process; O_CLOEXEC: an exec'd successor (a hot-restarted mrpcd) opens
    # its own; a forked child reopens (pid check) and never writes to an inherited fd
    # number that it may have closed and reused
    out = {"pid": -1, "fd": -1}
    started: dict[int, int] = {}
    clock, ident = time.monotonic_ns, threading.get_ident

    def fd() -> int:
        if out["pid"] != os.getpid():
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            out["fd"] = os.open(f"{path}.{os.getpid()}", flags, 0o644)
            out["pid"] = os.getpid()
        return out["fd"]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[ident()] = clock()
            return
        t0 = started.pop(ident(), None)
        if t0 is None:
            return
        dt = clock() - t0
        if dt >= MIN_NS or info["generation"] == 2:
            line = f"{t0} {dt} {info['generation']} {info['collected']} "
            try:
                os.write(fd(), (line + threading.current_thread().name + "\n").encode())
            except OSError:
                pass  # a probe must not disturb the process it watches

    gc.callbacks.append(on_gc)


if os.environ.get("MRPC_BENCH_GC_LOG"):
    _install(os.environ["MRPC_BENCH_GC_LOG"])
if os.environ.get("MRPC_BENCH_GC") == "no-full":
    gc.set_threshold(700, 10, 10**9)
elif os.environ.get("MRPC_BENCH_GC") == "freeze":

    def _freeze_once(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            gc.callbacks.remove(_freeze_once)
            gc.freeze()

    gc.callbacks.append(_freeze_once)
