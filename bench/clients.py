"""Closed-loop load generators shared by every client driver.

A *window* keeps ``conc`` calls outstanding until ``duration`` seconds pass or
``max_calls`` complete, whichever comes first, and records each call's latency.
``run_threads`` does it with one thread per outstanding call (sync APIs),
``run_tasks`` with one asyncio task per outstanding call (aio APIs). Drivers
with their own event loop (the floors) build a :class:`Window` themselves.
"""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

MAX_ERRORS_KEPT = 3


@dataclass
class Window:
    """What one measured window produced."""

    count: int = 0
    elapsed_s: float = 0.0
    lat_ns: array = field(default_factory=lambda: array("q"))
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def add_error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERRORS_KEPT:
            self.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])


def run_inline(call: Callable[[], object], duration: float, max_calls: int) -> Window:
    """One outstanding call, looped on the calling thread (no thread hand-offs)."""
    win = Window()
    lat = win.lat_ns
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(duration * 1e9)
    n = 0
    while n < max_calls:
        t0 = clock()
        if t0 >= deadline:
            break
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - counted and reported
            win.add_error(exc)
            if win.errors > 1000:
                break
            continue
        lat.append(clock() - t0)
        n += 1
    win.count = n
    win.elapsed_s = (clock() - start) / 1e9
    return win


def run_threads(
    make_call: Callable[[int], Callable[[], object]],
    conc: int,
    duration: float,
    max_calls: int,
) -> Window:
    """One thread per outstanding call; ``make_call(i)`` gives thread i its call.

    A single outstanding call runs inline on the calling thread.
    """
    if conc == 1:
        return run_inline(make_call(0), duration, max_calls)
    calls = [make_call(i) for i in range(conc)]
    per_thread = max(1, max_calls // conc)
    results: list[Window] = [Window() for _ in range(conc)]
    barrier = threading.Barrier(conc + 1)
    start_box: list[float] = []

    def body(i: int) -> None:
        call = calls[i]
        win = results[i]
        lat = win.lat_ns
        clock = time.perf_counter_ns
        barrier.wait()
        deadline = start_box[0] + int(duration * 1e9)
        n = 0
        while n < per_thread:
            t0 = clock()
            if t0 >= deadline:
                break
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                win.add_error(exc)
                if win.errors > 1000:
                    break
                continue
            lat.append(clock() - t0)
            n += 1
        win.count = n

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(conc)]
    for t in threads:
        t.start()
    start_box.append(time.perf_counter_ns())
    barrier.wait()
    for t in threads:
        t.join(timeout=duration + 60.0)
    elapsed = (time.perf_counter_ns() - start_box[0]) / 1e9
    return merge(results, elapsed)


async def run_tasks(
    acall: Callable[[], Awaitable[object]],
    conc: int,
    duration: float,
    max_calls: int,
) -> Window:
    """One asyncio task per outstanding call, all sharing ``acall``."""
    per_task = max(1, max_calls // conc)
    results: list[Window] = [Window() for _ in range(conc)]
    start = time.perf_counter_ns()
    deadline = start + int(duration * 1e9)

    async def body(i: int) -> None:
        win = results[i]
        lat = win.lat_ns
        clock = time.perf_counter_ns
        n = 0
        while n < per_task:
            t0 = clock()
            if t0 >= deadline:
                break
            try:
                await acall()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                win.add_error(exc)
                if win.errors > 1000:
                    break
                continue
            lat.append(clock() - t0)
            n += 1
        win.count = n

    await asyncio.wait_for(asyncio.gather(*(body(i) for i in range(conc))), timeout=duration + 60.0)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    return merge(results, elapsed)


def merge(parts: list[Window], elapsed: float) -> Window:
    out = Window(elapsed_s=elapsed)
    for w in parts:
        out.count += w.count
        out.lat_ns.extend(w.lat_ns)
        out.errors += w.errors
        for e in w.error_samples:
            if len(out.error_samples) < MAX_ERRORS_KEPT:
                out.error_samples.append(e)
    return out
