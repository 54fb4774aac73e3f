"""The runtime loop: commands between rounds, rounds until quiescent (within a
budget), sleeping until the earliest engine timer, wake-ups from other threads,
and a failing engine that is logged without stopping the loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mrpcd import runtime as rt
from mrpcd.engine import Engine, EngineContext, MockClock, MonotonicClock
from mrpcd.runtime import MAX_ROUNDS, MAX_SLEEP, Runtime


class Worker(Engine):
    """Does one unit of work per ``do_work`` while ``backlog`` lasts (forever if None)."""

    NAME = "test-worker"

    def __init__(
        self,
        name: str = "w",
        backlog: int | None = 0,
        timer: float | None = None,
        on_work: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(EngineContext(f"t/{name}", "t", 1, MockClock()), {})
        self.backlog = backlog
        self.timer = timer
        self.on_work = on_work
        self.calls = 0
        self.log: list[str] = []

    def do_work(self) -> int:
        self.calls += 1
        self.log.append("work")
        if self.on_work is not None:
            self.on_work()
        if self.backlog is None:
            return 1
        if self.backlog:
            self.backlog -= 1
            return 1
        return 0

    def next_timer(self) -> float | None:
        return self.timer


class Broken(Engine):
    NAME = "test-broken"

    def __init__(self) -> None:
        super().__init__(EngineContext("t/broken-1", "t", 1, MockClock()), {})
        self.calls = 0

    def do_work(self) -> int:
        self.calls += 1
        raise RuntimeError("engine exploded")


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    r = Runtime("test", MockClock(), spin_us=0)
    yield r
    r.stop()


def test_commands_run_before_the_rounds_and_never_during_one(runtime: Runtime) -> None:
    w = Worker(backlog=2)
    runtime.add_engine(w)
    runtime.post(lambda: w.log.append("cmd-1"))
    # a command posted from inside do_work waits for the next _work, after the rounds
    w.on_work = lambda: runtime.post(lambda: w.log.append("cmd-2")) if w.calls == 1 else None
    runtime.run_once()
    assert w.log == ["cmd-1", "work", "work", "work"]
    runtime.run_once()
    assert w.log[4:] == ["cmd-2", "work"]


def test_a_failing_command_is_logged_and_the_next_still_runs(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    ran = []

    def bad() -> None:
        raise ValueError("command exploded")

    runtime.post(bad)
    runtime.post(lambda: ran.append(1))
    with caplog.at_level(logging.ERROR, logger="mrpcd.runtime"):
        runtime.run_once()
    assert ran == [1]
    assert "command failed" in caplog.text and "command exploded" in caplog.text


def test_rounds_repeat_until_no_engine_finds_work(runtime: Runtime) -> None:
    busy, idle = Worker("busy", backlog=5), Worker("idle", backlog=0)
    runtime.add_engine(busy)
    runtime.add_engine(idle)
    assert runtime.run_once() == 5
    assert (
        busy.calls == 6 and idle.calls == 6
    )  # every engine once per round, the last round finds nothing
    assert runtime.run_once() == 0 and busy.calls == 7


def test_rounds_stop_at_max_rounds_when_an_engine_never_goes_idle(runtime: Runtime) -> None:
    w = Worker(backlog=None)
    runtime.add_engine(w)
    assert runtime.run_once() == MAX_ROUNDS
    assert w.calls == MAX_ROUNDS


def test_rounds_stop_after_the_rounds_budget(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = [0.0]
    monkeypatch.setattr(rt.time, "perf_counter", lambda: fake[0])

    def spend() -> None:
        fake[0] += rt.ROUNDS_BUDGET * 0.4  # each round spends 40% of the budget

    w = Worker(backlog=None, on_work=spend)
    runtime.add_engine(w)
    runtime.run_once()
    assert w.calls == 3  # 0.8 of the budget after two rounds, 1.2 after the third: stop


def test_a_failing_engine_is_logged_and_the_others_keep_working(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    broken, w = Broken(), Worker(backlog=3)
    runtime.add_engine(broken)
    runtime.add_engine(w)
    with caplog.at_level(logging.ERROR, logger="mrpcd.runtime"):
        assert runtime.run_once() == 3
    assert w.backlog == 0 and broken.calls == 4
    assert "engine t/broken-1 failed in do_work" in caplog.text and "engine exploded" in caplog.text


def test_sleep_lasts_until_the_earliest_engine_timer() -> None:
    clock = MockClock()
    r = Runtime("timers", clock, spin_us=0)
    try:
        assert r._sleep_timeout() == MAX_SLEEP  # no engine: the safety net only
        for t in (None, clock.now() + 0.3, clock.now() + 0.05, clock.now() + 0.2):
            r.add_engine(Worker(timer=t))
        assert r._sleep_timeout() == pytest.approx(0.05)
        clock.advance(0.04)
        assert r._sleep_timeout() == pytest.approx(0.01)
        clock.advance(1.0)
        assert r._sleep_timeout() == 0.0  # overdue: do not block at all
    finally:
        r.stop()


def _started(engines: list[Engine], monkeypatch: pytest.MonkeyPatch) -> Runtime:
    monkeypatch.setattr(rt, "MAX_SLEEP", 30.0)  # no safety-net wake-up within a test
    r = Runtime("threaded", MonotonicClock(), spin_us=0)
    for e in engines:
        r.add_engine(e)
    r.start()
    return r


def _wait(cond: Callable[[], Any], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return bool(cond())


def test_an_idle_runtime_blocks_and_a_timer_wakes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    w = Worker()
    r = _started([w], monkeypatch)
    try:
        assert _wait(lambda: r.sleeps > 0)
        calls = w.calls
        time.sleep(0.2)
        assert w.calls - calls <= 2, "an idle runtime must block, not poll"
        fired = threading.Event()
        due = time.monotonic() + 0.1

        def arm() -> None:
            w.timer = due
            w.on_work = lambda: fired.set() if time.monotonic() >= due else None

        r.post(arm)
        assert fired.wait(5.0), "the runtime slept past its engine's timer"
    finally:
        r.stop()


def test_call_from_another_thread_wakes_a_sleeping_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    r = _started([Worker()], monkeypatch)
    try:
        assert _wait(lambda: r.sleeps > 0)
        t0 = time.monotonic()
        assert r.call(lambda: threading.current_thread().name, timeout=5.0) == "mrpcd-threaded"
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(KeyError):  # the command's error reaches the caller
            r.call(lambda: {}["missing"], timeout=5.0)
    finally:
        r.stop()


def test_the_loop_survives_a_failing_engine(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken, w = Broken(), Worker()
    with caplog.at_level(logging.ERROR, logger="mrpcd.runtime"):
        r = _started([broken, w], monkeypatch)
        try:
            assert _wait(lambda: broken.calls > 0)
            r.call(lambda: setattr(w, "backlog", 10), timeout=5.0)
            assert _wait(lambda: w.backlog == 0), "the loop stopped after an engine failed"
            assert r._thread.is_alive()
        finally:
            r.stop()
    assert "failed in do_work" in caplog.text
