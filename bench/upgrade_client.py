"""The runner's side of a bench app (``Client``) and of the GC probe (``app_env``,
``add_gc``), shared by bench/upgrade.py and bench/upgrade_envoy.py."""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any

from bench import gcprobe, procs, stall
from bench.upgrade_plan import UpgradePlan

log = logging.getLogger(__name__)


class Client:
    """The client app process, driven over its stdin/stdout."""

    def __init__(
        self, argv: list[str], log_dir: Path, cpus: Any, env: dict[str, str] | None = None
    ) -> None:
        self.proc = procs.spawn(
            "client-app",
            argv,
            log_dir=log_dir,
            cpus=cpus,
            stdin_pipe=True,
            stdout_pipe=True,
            env=procs.child_env(env),
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        out = self.proc.popen.stdout
        assert out is not None
        for line in out:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                log.warning("client app said: %s", line[:200])
        self.events.put({"event": "eof"})

    def send(self, cmd: str) -> None:
        stdin = self.proc.popen.stdin
        assert stdin is not None
        stdin.write(cmd.encode() + b"\n")
        stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            got = self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the client app did not say {event!r} in {timeout:.0f}s") from None
        if got.get("event") != event:
            raise RuntimeError(
                f"the client app said {got} instead of {event!r}:\n{self.proc.log_tail()}"
            )
        return got


def app_env(plan: UpgradePlan, log_dir: Path, role: str) -> dict[str, str]:
    """The GC probe's environment for a bench app (apps always collect as usual)."""
    return gcprobe.env(log_dir, role, probe=plan.gc_probe)


def add_gc(rec: dict[str, Any], log_dir: Path, done: Any) -> None:
    """Every process's GC pauses of at least 1 ms during the load into ``rec["gc"]``; the
    pauses that make up the stall, and the longest gap before (cover at least a third of
    it), into the analysis (``gc_at_stall``, ``gc_at_gap_before``); and both figures again
    over the gaps that are not a collection's (``*_clear_of_gc_ms``)."""
    a, t0 = rec["analysis"], rec["started_ns"]
    if not any(log_dir.glob("gc-*")):
        return  # the probe was off
    ps = gcprobe.pauses(log_dir, t0 - 5 * stall.NS, rec["client"]["stopped_ns"])
    rec["gc"] = gcprobe.record([p for p in ps if p.ns >= 1_000_000 and p.start_ns >= t0], t0)
    spans = [(p.start_ns, p.start_ns + p.ns) for p in ps if p.ns >= 1_000_000]
    sec = lambda x: t0 + int(x * stall.NS)
    for key, (lo, hi) in (("stall", a["window_s"]), ("gap_before", a["before_window_s"])):
        if hi > lo:
            g = stall.longest_gap_clear_of(done, sec(lo), sec(hi), spans)
            a[f"{key}_clear_of_gc_ms"] = g / 1e6
    for key, at, ms in (
        ("gc_at_stall", a["stall_at_s"], a["stall_ms"]),
        ("gc_at_gap_before", a.get("gap_before_at_s"), a["gap_before_ms"]),
    ):
        if at is None or not ms:
            continue
        start, end = t0 + int(at * stall.NS), t0 + int(at * stall.NS) + int(ms * 1e6)
        if stall.covered(start, end, spans) >= stall.GC_SHARE * (end - start):
            a[key] = [p.brief() for p in gcprobe.overlapping(ps, start, end)]
