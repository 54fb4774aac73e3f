"""Runtimes: OS threads that drive engines and sleep when none has work.

How this works: each round a runtime runs queued commands (attach, detach,
upgrade, cleanup — so they never race with ``do_work``), calls ``do_work`` on
every engine, and polls its epoll set without blocking. While rounds find work,
or for ``spin_us`` after the last one, it keeps going (cheap busy-poll: no
wake-up latency under load). Then it asks every engine to ``prepare_sleep``
(arm ring "sleeping" flags), and blocks in ``epoll`` until an fd is ready, the
earliest engine timer is due, or a command arrives. An idle daemon therefore
uses no CPU.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from mrpcd.engine import Clock, Engine

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_SLEEP = 0.5  # seconds; a safety net against a lost wake-up
MAX_ROUNDS = 16  # engine rounds per wake-up before checking sockets again
ROUNDS_BUDGET = 0.01  # seconds of engine rounds per wake-up before checking sockets again
SLOW_ENGINE = 0.1  # seconds: a do_work this long is logged (engines bound their own work)


def effective_spin(spin_us: int) -> float:
    """Busy-poll time in seconds; none when confined to one CPU (spinning there only
    delays the process we are waiting for)."""
    try:
        if len(os.sched_getaffinity(0)) <= 1:
            return 0.0
    except OSError:
        pass
    return spin_us / 1e6


class Poller:
    """epoll with a callback per fd; only used from its runtime's thread."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[int], None]] = {}

    def register(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self._ep.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def poll(self, timeout: float) -> int:
        try:
            events = self._ep.poll(timeout)
        except InterruptedError:
            return 0
        handlers = self._handlers
        for fd, ev in events:
            handler = handlers.get(fd)
            if handler is not None:
                handler(ev)
        return len(events)

    def close(self) -> None:
        self._ep.close()


class Runtime:
    def __init__(self, name: str, clock: Clock, *, spin_us: int = 50) -> None:
        self.name = name
        self.clock = clock
        self.spin_us = spin_us
        self.spin = effective_spin(spin_us)
        self.engines: list[Engine] = []
        self.poller = Poller()
        self.local: dict[str, Any] = {}  # runtime-local state shared by its engines (QoS)
        self._commands: deque[Callable[[], None]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poller.register(self._wake_fd, select.EPOLLIN, self._on_wake)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"mrpcd-{name}", daemon=True)
        self.rounds = 0
        self.sleeps = 0
        self.slow_rounds = 0

    # ----------------------------------------------------------- control side

    def start(self) -> None:
        self._thread.start()

    def in_runtime(self) -> bool:
        return threading.current_thread() is self._thread

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the runtime thread soon (fire and forget)."""
        self._commands.append(fn)
        self.wake()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the runtime thread and return its result (or raise its error)."""
        if self.in_runtime() or not self._thread.is_alive():
            return fn()
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self.post(run)
        return fut.result(timeout)

    def wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    def wake_soon(self) -> None:
        """From any thread: make the runtime run a round soon. Free on the runtime's
        own thread (it runs another round after work, and engines report queued
        input from ``prepare_sleep``); one eventfd write from any other."""
        if threading.current_thread() is not self._thread:
            self.wake()

    def add_engine(self, engine: Engine) -> None:
        assert self.in_runtime() or not self._thread.is_alive()
        self.engines.append(engine)

    def remove_engine(self, engine: Engine) -> None:
        assert self.in_runtime() or not self._thread.is_alive()
        if engine in self.engines:
            self.engines.remove(engine)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self.wake()
        if self._thread.is_alive() and not self.in_runtime():
            self._thread.join(timeout)
        self.poller.close()
        os.close(self._wake_fd)

    # ----------------------------------------------------------- the loop

    def _on_wake(self, _events: int) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def _run_commands(self) -> int:
        n = 0
        commands = self._commands
        while commands:
            fn = commands.popleft()
            n += 1
            try:
                fn()
            except Exception:
                log.exception("runtime %s: command failed", self.name)
        return n

    def _work(self) -> int:
        """Commands, then engine rounds until a round finds nothing (no syscalls here).

        Every engine gets one ``do_work`` per round, in turn (the frontends bound
        theirs to ``limits.slice_us``), and the rounds stop after ROUNDS_BUDGET so
        sockets are polled again even while some app keeps its engines busy."""
        n = self._run_commands()
        perf = time.perf_counter
        start = perf()
        for _ in range(MAX_ROUNDS):
            done = 0
            for engine in self.engines:
                t0 = perf()
                try:
                    done += engine.do_work()
                except Exception:
                    log.exception(
                        "runtime %s: engine %s failed in do_work",
                        self.name,
                        getattr(engine, "ctx", None) and engine.ctx.engine_id,
                    )
                took = perf() - t0
                if took > SLOW_ENGINE:
                    self._slow(engine, took)
            n += done
            if not done or perf() - start > ROUNDS_BUDGET:
                break
        return n

    def _slow(self, engine: Engine, took: float) -> None:
        eid = getattr(engine, "ctx", None) and engine.ctx.engine_id
        self.slow_rounds += 1
        if self.slow_rounds <= 10 or self.slow_rounds % 1000 == 0:
            log.warning(
                "runtime %s: engine %s held the runtime for %.0f ms in one do_work "
                "(%d such rounds so far)",
                self.name,
                eid,
                took * 1e3,
                self.slow_rounds,
            )

    def run_once(self) -> int:
        """One round without blocking; returns the work done (tests drive this)."""
        n = self.poller.poll(0)
        return n + self._work()

    def _sleep_timeout(self) -> float:
        now = self.clock.now()
        timeout = MAX_SLEEP
        for engine in self.engines:
            t = engine.next_timer()
            if t is not None:
                timeout = min(timeout, max(0.0, t - now))
        return timeout

    def _run(self) -> None:
        profile_to = os.environ.get("MRPC_PROFILE")  # debugging aid: cProfile this runtime
        if not profile_to:
            return self._loop()
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            self._loop()
        finally:
            prof.disable()
            prof.dump_stats(f"{profile_to}.{self.name}.{os.getpid()}")

    def _loop(self) -> None:
        """poll (handlers run) -> engine rounds -> spin or arm wake-ups and block.

        One ``epoll_wait`` per event when idle between events: a blocking one.
        """
        perf = time.perf_counter
        engines = self.engines
        spin_until = 0.0
        timeout = 0.0
        armed = False
        recheck = 0.0
        while not self._stop:
            self.rounds += 1
            n = self.poller.poll(timeout)
            if armed:
                for engine in engines:
                    engine.woke()
                armed = False
            n += self._work()
            now = perf()
            if n:
                spin_until = now + self.spin
            if now < spin_until:
                timeout = 0.0
                continue
            pending = False
            for engine in engines:
                pending |= engine.prepare_sleep()
            armed = True
            if pending or self._commands:
                timeout = 0.0
                continue
            self.sleeps += 1
            timeout = self._sleep_timeout()
            if now >= recheck:  # someone may have pinned us (taskset) since we started
                self.spin = effective_spin(self.spin_us)
                recheck = now + 0.1
