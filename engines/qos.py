"""The ``qos`` policy: latency-sensitive calls first, across the apps of one runtime.

How this works
--------------
Every app's datapath has its own ``qos`` instance; the instances of one runtime
share a :class:`QosScheduler` in ``ctx.runtime_local["qos"]`` (created by the
first instance; any object with ``last_priority`` and ``instances`` is adopted,
so instances of an upgraded module version keep sharing it with older ones).
A CALL is *priority* when its message is smaller than ``small_threshold``
bytes or its app is ``latency_sensitive``; otherwise *bulk*.

1. A priority call is forwarded at once and stamps ``scheduler.last_priority``.
2. "Priority is active" while ``now - last_priority < priority_window``.
3. A bulk call passes at once when priority is idle and its app holds no bulk;
   otherwise it is held at the tail of its app's FIFO.
4. In each ``do_work`` turn (one round-robin slot per app) an idle-priority
   scheduler lets the app release held bulk up to ``bulk_budget_bytes`` (at least
   one call), so bulk apps share the runtime in byte-fair turns.
5. Starvation bound: a call held ``max_delay`` is released whatever priority
   traffic does; with more than ``max_held`` held the oldest is released early.

So bulk waits only while latency-sensitive traffic is (recently) active, never
more than ``max_delay``.

In-flight cap (``bulk_inflight: N``, work-conserving; replaces steps 2-5): bulk
calls are admitted while fewer than N released bulk calls of this app await
their replies; the rest wait here, in order, and each reply (or error) admits
the next. Downstream queues (sockets, the peer daemon, the server's ring) then
never hold more than N bulk calls of this app, so a latency-sensitive call
overtakes all but N of them, while bulk keeps the pipe full. ``next_timer()`` is the earlier of the oldest call's
``max_delay`` and the end of the priority window (``now`` if a budgeted turn is
due). ``flush()`` releases every held call; ``decompose()`` carries them over.
Shadow mode (``enforce: false``) counts ``would_hold`` and forwards.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from typing import Any

from libmrpc.status import ConfigError
from mrpcd.engine import EngineContext, PolicyEngine, Reject, Rpc, Verdict

DEFAULTS: dict[str, Any] = {
    "small_threshold": 4096,  # bytes: smaller calls are priority
    "latency_sensitive": False,  # every call of this app is priority
    "bulk_budget_bytes": 256 * 1024,  # bulk bytes one app releases per turn
    "priority_window": 0.001,  # seconds priority counts as active after a priority call
    "max_delay": 0.002,  # seconds a bulk call may be held at most
    "max_held": 10_000,  # bulk calls held at most per app
    "bulk_inflight": None,  # cap on this app's bulk calls in flight downstream (None: time-based)
}
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_SLACK = 1e-9  # seconds: float rounding must not make a timer fire a hair too early
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s)?\s*$")


class QosScheduler:
    """Runtime-local state the qos instances of different apps cooperate through."""

    def __init__(self, last_priority: float = -math.inf) -> None:
        self.last_priority = last_priority  # clock time of the latest priority call
        self.instances = 0  # qos instances using this scheduler


def priority_active(scheduler: QosScheduler, now: float, window: float) -> bool:
    """Whether a priority call was seen within ``window`` seconds before ``now``."""
    return now + _SLACK < scheduler.last_priority + window


class Qos(PolicyEngine):
    """Small/latency-sensitive calls first, bulk held briefly; see the module docstring."""

    NAME = "qos"
    VERSION = 1

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.counters.update(
            {
                "priority": 0,
                "bulk": 0,
                "bulk_direct": 0,
                "released": 0,
                "released_overdue": 0,
                "flushed": 0,
                "overflow": 0,
            }
        )
        self.hold_seconds = 0.0  # total time bulk calls spent held
        self._held: deque[tuple[Rpc, float]] = deque()  # (call, clock time held)
        self._out: set[int] = set()  # bulk calls released and not answered yet (bulk_inflight)
        self.scheduler = self._join(ctx.runtime_local)

    @staticmethod
    def _join(runtime_local: dict[str, Any]) -> QosScheduler:
        found: Any = runtime_local.get("qos")
        if not (hasattr(found, "last_priority") and hasattr(found, "instances")):
            found = QosScheduler(getattr(found, "last_priority", -math.inf))
            runtime_local["qos"] = found
        found.instances += 1
        scheduler: QosScheduler = found  # or a compatible one from another module version
        return scheduler

    # ------------------------------------------------------------------ config

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The complete config; ``ConfigError`` names the key and the expected value."""
        out = cls.common_config(config, set(DEFAULTS))
        for key, low in (("small_threshold", 0), ("bulk_budget_bytes", 1), ("max_held", 1)):
            value = config.get(key, DEFAULTS[key])
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{cls.NAME}: {key}: expected an integer >= {low}, got {value!r}")
            out[key] = value
        sensitive = config.get("latency_sensitive", False)
        if not isinstance(sensitive, bool):
            raise ConfigError(
                f"{cls.NAME}: latency_sensitive: expected true or false, got {sensitive!r}"
            )
        out["latency_sensitive"] = sensitive
        for key in ("priority_window", "max_delay"):
            out[key] = _duration(key, config.get(key, DEFAULTS[key]))
        cap = config.get("bulk_inflight", None)
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(
                f"{cls.NAME}: bulk_inflight: expected an integer >= 1 or null, got {cap!r}"
            )
        out["bulk_inflight"] = cap
        return out

    # ------------------------------------------------------------------ decisions

    def on_call(self, rpc: Rpc) -> Verdict | Reject:
        now = self.ctx.clock.now()
        c = self.config
        if c["latency_sensitive"] or rpc.size < c["small_threshold"]:
            self.counters["priority"] += 1
            self.scheduler.last_priority = now
            return Verdict.PASS
        self.counters["bulk"] += 1
        cap = c["bulk_inflight"]
        if cap is not None:
            if not self._held and len(self._out) < cap:
                self._out.add(rpc.call_id)
                self.counters["bulk_direct"] += 1
                return Verdict.PASS
        elif not self._held and not priority_active(self.scheduler, now, c["priority_window"]):
            self.counters["bulk_direct"] += 1
            return Verdict.PASS
        if not self.enforce:
            self.counters["would_hold"] += 1
            return Verdict.PASS
        if len(self._held) >= c["max_held"]:
            self._release_head(now, "overflow")
        self._held.append((rpc, now))
        return Verdict.HOLD

    def on_reply(self, rpc: Rpc) -> None:
        if self._out:
            self._out.discard(rpc.call_id)  # its slot is free (reply or error alike)

    def do_work(self) -> int:
        n = super().do_work()
        return n + self._release(self.ctx.clock.now()) if self._held else n

    def _release_head(self, now: float, counter: str) -> None:
        rpc, since = self._held.popleft()
        self.hold_seconds += now - since
        self.counters[counter] += 1
        self.release(rpc)

    def _release(self, now: float) -> int:
        n = 0
        cap = self.config["bulk_inflight"]
        if cap is not None:
            while self._held and len(self._out) < cap:
                self._out.add(self._held[0][0].call_id)
                self._release_head(now, "released")
                n += 1
            return n
        max_delay = self.config["max_delay"]
        while self._held and now + _SLACK >= self._held[0][1] + max_delay:
            self._release_head(now, "released_overdue")
            n += 1
        if self._held and not priority_active(self.scheduler, now, self.config["priority_window"]):
            budget, first = self.config["bulk_budget_bytes"], True
            while self._held and (first or self._held[0][0].size <= budget):
                budget -= self._held[0][0].size
                self._release_head(now, "released")
                n, first = n + 1, False
        return n

    def flush(self) -> int:
        """Release every held bulk call now, oldest first; return how many."""
        now, n = self.ctx.clock.now(), len(self._held)
        while self._held:
            self._release_head(now, "flushed")
        return n

    def next_timer(self) -> float | None:
        if not self._held or self.config["bulk_inflight"] is not None:
            return None  # the cap mode is driven by replies, not by time
        now = self.ctx.clock.now()
        window_end = self.scheduler.last_priority + self.config["priority_window"]
        return max(now, min(self._held[0][1] + self.config["max_delay"], window_end))

    # ------------------------------------------------------------------ state

    def statistics(self) -> dict[str, int | float]:
        stats: dict[str, int | float] = dict(self.counters)
        stats["held_now"] = len(self._held)
        stats["bulk_in_flight"] = len(self._out)
        stats["hold_seconds"] = self.hold_seconds
        return stats

    def decompose(self) -> dict[str, Any]:
        """Counters and held calls (a snapshot: this engine is unchanged)."""
        return {
            "counters": dict(self.counters),
            "hold_seconds": self.hold_seconds,
            "held": [[rpc, since] for rpc, since in self._held],
            "out": sorted(self._out),
        }

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        """Adopt a predecessor's state, replacing (not merging) the held calls."""
        super().load_state(state, prev_version)
        self.hold_seconds = float(state.get("hold_seconds", 0.0))
        self._held = deque((rpc, float(since)) for rpc, since in state.get("held", []))
        self._out = set(state.get("out", ()))

    def close(self) -> None:
        self.scheduler.instances -= 1

    def handle_request(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """``stats`` -> counters; ``scheduler`` -> the shared scheduler's view."""
        op = cmd.get("op")
        if op == "stats":
            return {"engine": self.NAME, "id": self.ctx.engine_id, "stats": self.statistics()}
        if op == "scheduler":
            now, last = self.ctx.clock.now(), self.scheduler.last_priority
            return {
                "instances": self.scheduler.instances,
                "priority_active": priority_active(
                    self.scheduler, now, self.config["priority_window"]
                ),
                "since_priority": None if math.isinf(last) else now - last,
            }
        return super().handle_request(cmd)


def _duration(key: str, value: object) -> float:
    seconds = -1.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not 0 < seconds < math.inf:
        raise ConfigError(
            f'{Qos.NAME}: {key}: expected seconds > 0 (a number or "2ms"), got {value!r}'
        )
    return seconds


ENGINE = Qos
