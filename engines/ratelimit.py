"""The ``ratelimit`` policy: an Envoy-style token bucket per application (or per method).

How this works
--------------
A bucket holds at most ``max_tokens`` tokens and starts full. Every
``fill_interval`` seconds it gains ``tokens_per_fill`` tokens (capped at
``max_tokens``), in whole fills exactly like Envoy's ``local_ratelimit``. No
timer drives the refill: when a call arrives the bucket computes how many fills
happened since it last looked (``ctx.clock.now()``), so reject mode costs
nothing while idle. Each CALL takes one token. Without a token:

* ``mode: reject`` (default) - the call fails at once with RESOURCE_EXHAUSTED;
  the details name the policy, the limit and what to do.
* ``mode: delay`` - the call is held in FIFO order (per bucket) and released by
  ``do_work`` when fills arrive; ``next_timer()`` says when the next fill is due.
  Held calls whose deadline passes fail with DEADLINE_EXCEEDED; at most
  ``max_held`` calls wait, later ones are rejected. ``flush()`` releases every
  held call at once, so detaching the policy loses nothing.

One engine instance serves one application, so the default scope is the app;
``per_method: true`` keeps one bucket per method path.

Choosing settings
-----------------
Long-run rate = ``tokens_per_fill / fill_interval``; burst = ``max_tokens``. Over
any window ``T`` at most ``max_tokens + rate * T`` calls pass, so the error of the
measured rate is at most ``max_tokens / (rate * T)``. For 500 calls/s the
recommended setting is ``max_tokens: 50, tokens_per_fill: 50, fill_interval:
100ms``: bursts of at most 50 back-to-back calls, and within 1 % over 10 s.
A smaller interval (``5`` per ``10ms``) smooths bursts further but, in delay mode,
wakes the runtime more often; keep ``fill_interval`` >= 1 ms. ``max_tokens`` much
larger than ``tokens_per_fill`` lets an idle client burst that much above the rate.

``decompose()`` is a snapshot (it does not change this engine, so a rolled-back
upgrade can re-attach it) and ``load_state()`` replaces held state rather than
merging it, so applying one state twice never duplicates a call.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from typing import Any

from libmrpc.status import ConfigError, StatusCode
from mrpcd.engine import EngineContext, PolicyEngine, Reject, Rpc, Verdict

_MODES = ("reject", "delay")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h)?\s*$")
DEFAULTS: dict[str, Any] = {
    "fill_interval": 1.0,
    "mode": "reject",
    "per_method": False,
    "max_held": 10_000,
}
KEYS = frozenset({"max_tokens", "tokens_per_fill", *DEFAULTS})
_STATE_KEYS = frozenset({"counters", "buckets", "held", "seq"})  # what decompose() hands over


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"1s"``, ``"100ms"``; ``ValueError`` if neither."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    raise ValueError(value)


class _Bucket:
    __slots__ = ("held", "last_fill", "tokens")

    def __init__(self, tokens: int, last_fill: float) -> None:
        self.tokens = tokens
        self.last_fill = last_fill
        self.held: deque[tuple[int, Rpc]] = deque()  # (arrival sequence number, call)

    def refill(self, now: float, per_fill: int, interval: float, cap: int) -> None:
        # the epsilon keeps a timer that fires at exactly last_fill + interval from
        # seeing 0.9999999 fills through float rounding
        fills = math.floor((now - self.last_fill) / interval + 1e-9)
        if fills > 0:
            self.tokens = min(cap, self.tokens + fills * per_fill)
            self.last_fill += fills * interval


class RateLimit(PolicyEngine):
    """Token-bucket rate limit; see the module docstring."""

    NAME = "ratelimit"
    VERSION = 1

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.counters.update({"released": 0, "expired": 0, "flushed": 0, "overflow": 0})
        self._buckets: dict[str, _Bucket] = {}
        self._seq = 0
        self._held = 0  # calls held in all buckets
        self._min_deadline = math.inf  # earliest deadline of a held call (lower bound)

    # ------------------------------------------------------------------ config

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The complete config; ``ConfigError`` names the key and the expected value."""
        out = cls.common_config(config, KEYS)
        if "max_tokens" not in config:
            raise ConfigError(f"{cls.NAME}: max_tokens: required (bucket size, an integer >= 1)")
        out["max_tokens"] = _positive_int(config, "max_tokens")
        out["tokens_per_fill"] = (
            _positive_int(config, "tokens_per_fill")
            if "tokens_per_fill" in config
            else out["max_tokens"]
        )
        raw = config.get("fill_interval", DEFAULTS["fill_interval"])
        try:
            interval = parse_duration(raw)
        except ValueError:
            interval = -1.0
        if not interval > 0 or math.isinf(interval):
            raise ConfigError(
                f"{cls.NAME}: fill_interval: expected seconds > 0 (a number or a "
                f'string like "100ms", "1s"), got {raw!r}'
            )
        out["fill_interval"] = interval
        mode = config.get("mode", DEFAULTS["mode"])
        if mode not in _MODES:
            raise ConfigError(f"{cls.NAME}: mode: expected reject or delay, got {mode!r}")
        out["mode"] = mode
        per_method = config.get("per_method", DEFAULTS["per_method"])
        if not isinstance(per_method, bool):
            raise ConfigError(f"{cls.NAME}: per_method: expected true or false, got {per_method!r}")
        out["per_method"] = per_method
        out["max_held"] = _positive_int(config, "max_held", DEFAULTS["max_held"])
        return out

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Apply new settings in place, all or nothing; current tokens are kept (clamped)."""
        old_per_method = self.config["per_method"]
        merged = dict(self.config)
        merged.update(config)
        self.config = self.validate_config(merged)  # raises before anything changes
        cap = self.config["max_tokens"]
        for bucket in self._buckets.values():
            bucket.tokens = min(bucket.tokens, cap)
        if self.config["per_method"] != old_per_method:
            # Bucket keys change meaning: start new buckets, keep held calls in arrival order.
            held = sorted((e for b in self._buckets.values() for e in b.held), key=lambda e: e[0])
            self._buckets = {}
            for seq, rpc in held:
                self._bucket(self._key(rpc)).held.append((seq, rpc))

    # ------------------------------------------------------------------ decisions

    def _key(self, rpc: Rpc) -> str:
        return rpc.method.path if self.config["per_method"] and rpc.method is not None else ""

    def _bucket(self, key: str) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.config["max_tokens"], self.ctx.clock.now())
        return bucket

    def _refill(self, bucket: _Bucket, now: float) -> None:
        c = self.config
        bucket.refill(now, c["tokens_per_fill"], c["fill_interval"], c["max_tokens"])

    def on_call(self, rpc: Rpc) -> Verdict | Reject:
        bucket = self._bucket(self._key(rpc))
        self._refill(bucket, self.ctx.clock.now())
        if not bucket.held and bucket.tokens >= 1:
            bucket.tokens -= 1
            return Verdict.PASS
        if self.config["mode"] == "reject" or self._held >= self.config["max_held"]:
            if self.config["mode"] == "delay" and self.enforce:
                self.counters["overflow"] += 1
            return Reject(StatusCode.RESOURCE_EXHAUSTED, self._details(rpc))
        if not self.enforce:
            self.counters["would_hold"] += 1
            return Verdict.PASS
        self._seq += 1
        bucket.held.append((self._seq, rpc))
        self._held += 1
        if rpc.deadline is not None:
            self._min_deadline = min(self._min_deadline, rpc.deadline)
        return Verdict.HOLD

    def _details(self, rpc: Rpc) -> str:
        c = self.config
        scope = (
            f"method {rpc.method.path}" if c["per_method"] and rpc.method else f"app {rpc.app!r}"
        )
        full = " (delay queue full)" if c["mode"] == "delay" else ""
        return (
            f"rate limited by policy {self.ctx.engine_id}: {scope} may make "
            f"{c['tokens_per_fill']} calls per {c['fill_interval']:g}s "
            f"(burst {c['max_tokens']}){full}; retry with backoff, or ask the operator to "
            f"raise the limit (mrpcctl policy set {self.ctx.engine_id} tokens_per_fill=N)"
        )

    # ------------------------------------------------------------------ held calls

    def do_work(self) -> int:
        n = self._release_ready() if self._held else 0
        return n + super().do_work()

    def _release_ready(self) -> int:
        now = self.ctx.clock.now()
        n = self._expire(now) if now >= self._min_deadline else 0
        for bucket in self._buckets.values():
            if not bucket.held:
                continue
            self._refill(bucket, now)
            while bucket.held and bucket.tokens >= 1:
                bucket.tokens -= 1
                self._release_one(bucket, "released")
                n += 1
        return n

    def _release_one(self, bucket: _Bucket, counter: str) -> None:
        _, rpc = bucket.held.popleft()
        self._held -= 1
        self.counters[counter] += 1
        self.release(rpc)

    def _expire(self, now: float) -> int:
        n, earliest = 0, math.inf
        for bucket in self._buckets.values():
            keep: deque[tuple[int, Rpc]] = deque()
            for seq, rpc in bucket.held:
                if rpc.deadline is not None and rpc.deadline <= now:
                    self._held -= 1
                    self.counters["expired"] += 1
                    n += 1
                    self.reject(
                        rpc,
                        StatusCode.DEADLINE_EXCEEDED,
                        f"deadline passed while held by rate limit {self.ctx.engine_id}; "
                        f"use a longer deadline or ask the operator to raise the limit",
                    )
                else:
                    keep.append((seq, rpc))
                    if rpc.deadline is not None:
                        earliest = min(earliest, rpc.deadline)
            bucket.held = keep
        self._min_deadline = earliest
        return n

    def flush(self) -> int:
        """Release every held call now (in arrival order per bucket); return how many."""
        n = 0
        for bucket in self._buckets.values():
            while bucket.held:
                self._release_one(bucket, "flushed")
                n += 1
        self._min_deadline = math.inf
        return n

    def next_timer(self) -> float | None:
        """The next fill of a bucket with held calls, or an earlier held deadline."""
        if not self._held:
            return None
        interval, now = self.config["fill_interval"], self.ctx.clock.now()
        due = min(
            now if b.tokens >= 1 else b.last_fill + interval
            for b in self._buckets.values()
            if b.held
        )
        return min(due, self._min_deadline)

    # ------------------------------------------------------------------ state

    def statistics(self) -> dict[str, int | float]:
        stats: dict[str, int | float] = dict(self.counters)
        stats["held_now"] = self._held
        stats["buckets"] = len(self._buckets)
        return stats

    def decompose(self) -> dict[str, Any]:
        """Counters, bucket levels and the held calls (a snapshot; see module docstring)."""
        held = sorted((e for b in self._buckets.values() for e in b.held), key=lambda e: e[0])
        return {
            "counters": dict(self.counters),
            "buckets": {k: [b.tokens, b.last_fill] for k, b in self._buckets.items()},
            "held": [[seq, rpc] for seq, rpc in held],
            "seq": self._seq,
        }

    @classmethod
    def check_compatible(cls, prev_version: int, state: Mapping[str, Any]) -> str | None:
        """A newer version's state is taken (a rollback) only if it has nothing this
        version does not know."""
        unknown = sorted(set(state) - _STATE_KEYS)
        if prev_version > cls.VERSION and unknown:
            return f"its state has {', '.join(map(str, unknown))}, unknown to v{cls.VERSION}"
        return None

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        """Adopt a predecessor's state, replacing this engine's buckets and held calls."""
        super().load_state(state, prev_version)
        cap = self.config["max_tokens"]
        self._buckets = {
            str(k): _Bucket(min(int(t), cap), float(lf))
            for k, (t, lf) in state.get("buckets", {}).items()
        }
        self._held, self._min_deadline = 0, math.inf
        for seq, rpc in state.get("held", []):
            self._bucket(self._key(rpc)).held.append((int(seq), rpc))
            self._held += 1
            if rpc.deadline is not None:
                self._min_deadline = min(self._min_deadline, rpc.deadline)
        self._seq = max(int(state.get("seq", 0)), self._seq)

    def handle_request(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """``stats`` -> counters; ``buckets`` -> current tokens per bucket key."""
        op = cmd.get("op")
        if op == "stats":
            return {"engine": self.NAME, "id": self.ctx.engine_id, "stats": self.statistics()}
        if op == "buckets":
            now = self.ctx.clock.now()
            for bucket in self._buckets.values():
                self._refill(bucket, now)
            return {
                "buckets": {
                    k: {"tokens": b.tokens, "held": len(b.held)} for k, b in self._buckets.items()
                }
            }
        return super().handle_request(cmd)


def _positive_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{RateLimit.NAME}: {key}: expected an integer >= 1, got {value!r}")
    return value


ENGINE = RateLimit
