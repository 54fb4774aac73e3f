"""Client-side entry point: ``python -m bench.worker CONFIG_JSON``.

Talks JSON lines with the runner: stdout carries events, stdin carries commands.

    worker -> {"event": "ready", "pid", "rss_kib", "info"}      after connecting
    runner -> {"cmd": "run", "duration", "warmup", "max_calls", "cdf"}
    worker -> {"event": "warm"}                                  warm-up done
    runner -> {"cmd": "go"}                                      start measuring now
    worker -> {"event": "result", "count", "elapsed_s", "cpu_s", "lat", ...}
    runner -> {"cmd": "exit"}                                    close and leave

The warm/go step lets the runner snapshot server CPU right at the start of the
measured window, with every client process started together. The worker's own
CPU is ``getrusage(RUSAGE_SELF)`` over the measured window (all its threads).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import resource
import sys
import traceback
from typing import Any

from bench import stats
from bench.clients import Window
from bench.procs import rss_kib

_loop: asyncio.AbstractEventLoop | None = None


def _resolve(value: Any) -> Any:
    """Run a coroutine on the worker's persistent event loop; pass anything else through."""
    global _loop
    if inspect.isawaitable(value):
        if _loop is None:
            _loop = asyncio.new_event_loop()
            asyncio.set_event_loop(_loop)
        return _loop.run_until_complete(value)
    return value


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _read_cmd() -> dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        return {"cmd": "exit"}
    return json.loads(line)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    from bench.systems import load_object

    case = config["case"]
    try:
        driver_cls = load_object(config["driver"])
        driver = driver_cls(config["server"], case)
        info = _resolve(driver.open()) or {}
    except Exception:  # noqa: BLE001 - reported to the runner verbatim
        _emit({"event": "error", "message": traceback.format_exc()})
        return 1
    _emit({"event": "ready", "pid": os.getpid(), "rss_kib": rss_kib(os.getpid()), "info": info})
    try:
        for _ in range(10_000):  # bounded: the runner sends a few commands per case
            cmd = _read_cmd()
            if cmd["cmd"] == "exit":
                break
            if cmd["cmd"] != "run":
                _emit({"event": "error", "message": f"unexpected command {cmd!r}"})
                return 1
            conc, size = case["conc"], case["req_size"]
            if cmd["warmup"] > 0:
                _resolve(driver.window(conc, size, cmd["warmup"], cmd["max_calls"]))
            _emit({"event": "warm"})
            go = _read_cmd()
            if go["cmd"] != "go":
                break
            cpu0 = _cpu_s()
            win: Window = _resolve(driver.window(conc, size, cmd["duration"], cmd["max_calls"]))
            cpu1 = _cpu_s()
            result: dict[str, Any] = {
                "event": "result",
                "count": win.count,
                "elapsed_s": win.elapsed_s,
                "errors": win.errors,
                "error_samples": win.error_samples,
                "cpu_s": cpu1 - cpu0,
                "rss_kib": rss_kib(os.getpid()),
                "lat": stats.latency_summary(win.lat_ns),
            }
            if cmd.get("cdf"):
                result["cdf"] = stats.cdf_sketch(win.lat_ns)
            _emit(result)
    except Exception:  # noqa: BLE001
        _emit({"event": "error", "message": traceback.format_exc()})
        return 1
    finally:
        try:
            _resolve(driver.close())
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            sys.stderr.write(f"closing the driver failed: {exc!r}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
