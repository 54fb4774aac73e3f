"""The ``logging`` policy: one access-log line per RPC, written when its reply passes.

How this works
--------------
On the engine's side (``send``: the app's outgoing calls; ``receive``: the calls
it serves) a CALL's start time and request size are remembered by ``call_id``;
when the REPLY comes back the engine writes one logfmt line::

    ts=2025-01-31T12:00:00.123456Z app=kv side=send method=/kv.KV/Get status=OK \
req_bytes=64 resp_bytes=8 latency_us=123 call_id=42

Error replies add ``details="..."`` (at most 200 characters). Values with
spaces, quotes, ``=`` or control characters are JSON-quoted, so an application
cannot forge log lines through its name or an error message. A reply whose call
was not seen (the engine attached mid-call) logs ``req_bytes=-`` and
``latency_us=-``.

``sample_rate`` keeps a deterministic fraction of calls: a call is logged when
a Fibonacci hash of its ``call_id`` falls below the rate, so runs are
reproducible and a call and its reply always agree. ``file`` is a path opened
in append mode, line-buffered, or ``"-"`` for stderr. A failing write (disk
full) is counted as ``write_errors``; it never fails an RPC.

This module is ``engines.logging``; ``import logging`` below is the standard
library's (absolute imports), which the test suite checks.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from libmrpc.status import ConfigError
from mrpcd.engine import EngineContext, PolicyEngine, Reject, Rpc, RpcKind, Side, Verdict

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"file": "-", "sample_rate": 1.0, "max_inflight": 1_000_000}
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Fibonacci hashing
_MASK = (1 << 64) - 1
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789./_-:+@")


def sampled(call_id: int, rate: float) -> bool:
    """Whether ``call_id`` is in the deterministic ``rate`` sample (0.0 .. 1.0)."""
    return ((call_id * _GOLDEN) & _MASK) < rate * (1 << 64)


def _value(text: str) -> str:
    """A logfmt value: bare when safe, else JSON-quoted (no spaces, quotes or newlines)."""
    return text if text and _PLAIN.issuperset(text) else json.dumps(text)


class AccessLog(PolicyEngine):
    """Writes an access-log line per sampled RPC; forwards everything unchanged."""

    NAME = "logging"
    VERSION = 1

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.counters.update({"logged": 0, "unmatched_replies": 0, "evicted": 0, "write_errors": 0})
        self._inflight: dict[int, tuple[float, int]] = {}  # call_id -> (start, request bytes)
        self._stream = self._open(self.config["file"])

    # ------------------------------------------------------------------ config

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The complete config; ``ConfigError`` names the key and the expected value."""
        out = cls.common_config(config, set(DEFAULTS))
        file = config.get("file", DEFAULTS["file"])
        if not isinstance(file, str) or not file or "\0" in file:
            raise ConfigError(f'{cls.NAME}: file: expected a path or "-" for stderr, got {file!r}')
        out["file"] = file
        rate = config.get("sample_rate", DEFAULTS["sample_rate"])
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
            raise ConfigError(
                f"{cls.NAME}: sample_rate: expected a number from 0.0 to 1.0, got {rate!r}"
            )
        out["sample_rate"] = float(rate)
        limit = config.get("max_inflight", DEFAULTS["max_inflight"])
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"{cls.NAME}: max_inflight: expected an integer >= 1, got {limit!r}")
        out["max_inflight"] = limit
        return out

    def _open(self, file: str) -> TextIO | None:
        """The stream for ``file`` (None = stderr); ``ConfigError`` if it cannot be opened."""
        if file == "-":
            return None
        try:
            return open(file, "a", buffering=1, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{self.NAME}: file: cannot open {file!r} for appending: "
                f"{exc.strerror or exc}; check the path and the daemon's "
                f"permissions"
            ) from None

    def update_config(self, config: Mapping[str, Any]) -> None:
        """All or nothing: a new file is opened before the old one is closed."""
        merged = dict(self.config)
        merged.update(config)
        checked = self.validate_config(merged)
        if checked["file"] != self.config["file"]:
            stream = self._open(checked["file"])
            self._close_stream()
            self._stream = stream
        self.config = checked

    # ------------------------------------------------------------------ datapath

    def do_work(self) -> int:
        send = self.ctx.side is Side.SEND
        return self._pump(self.tx_in, self.tx_out, calls=send) + self._pump(
            self.rx_in, self.rx_out, calls=not send
        )

    def _pump(self, src: deque[Rpc], dst: deque[Rpc], *, calls: bool) -> int:
        """Move ``src`` to ``dst``: decide our side's CALLs, log the REPLYs coming back."""
        n = 0
        while src:
            rpc = src.popleft()
            n += 1
            if rpc.kind is RpcKind.CALL and calls:
                self._decide(rpc)  # on_call, then forwarded by release()
                continue
            if rpc.kind is RpcKind.REPLY and not calls and self.matches(rpc):
                self._log_reply(rpc)
            dst.append(rpc)
        return n

    def on_call(self, rpc: Rpc) -> Verdict | Reject:
        if sampled(rpc.call_id, self.config["sample_rate"]):
            inflight = self._inflight
            if len(inflight) >= self.config["max_inflight"]:
                del inflight[next(iter(inflight))]  # oldest first
                self.counters["evicted"] += 1
            inflight[rpc.call_id] = (self.ctx.clock.now(), rpc.size)
        return Verdict.PASS

    def _log_reply(self, rpc: Rpc) -> None:
        start = self._inflight.pop(rpc.call_id, None)
        if start is None:
            if not sampled(rpc.call_id, self.config["sample_rate"]):
                return
            self.counters["unmatched_replies"] += 1
            req_bytes = latency = "-"
        else:
            req_bytes = str(start[1])
            latency = str(round((self.ctx.clock.now() - start[0]) * 1e6))
        ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = (
            f"ts={ts} app={_value(rpc.app)} side={self.ctx.side.value} "
            f"method={_value(rpc.method.path if rpc.method else '-')} "
            f"status={rpc.status.name} req_bytes={req_bytes} resp_bytes={rpc.size} "
            f"latency_us={latency} call_id={rpc.call_id}"
        )
        if rpc.is_error and rpc.details:
            line += f" details={json.dumps(rpc.details[:200])}"
        try:
            (self._stream or sys.stderr).write(line + "\n")
        except (OSError, ValueError):  # ValueError: the stream was closed under us
            if not self.counters["write_errors"]:
                log.exception(
                    "%s: cannot write the access log to %s", self.ctx.engine_id, self.config["file"]
                )
            self.counters["write_errors"] += 1
        else:
            self.counters["logged"] += 1

    # ------------------------------------------------------------------ state

    def statistics(self) -> dict[str, int | float]:
        stats: dict[str, int | float] = dict(self.counters)
        stats["inflight"] = len(self._inflight)
        return stats

    def decompose(self) -> dict[str, Any]:
        """Counters and the calls in flight (their start times and request sizes)."""
        return {
            "counters": dict(self.counters),
            "inflight": [[cid, t, size] for cid, (t, size) in self._inflight.items()],
        }

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        super().load_state(state, prev_version)
        self._inflight = {
            int(cid): (float(t), int(size)) for cid, t, size in state.get("inflight", [])
        }

    def handle_request(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """``stats`` -> counters; ``reopen`` -> reopen the file (after log rotation)."""
        op = cmd.get("op")
        if op == "stats":
            return {"engine": self.NAME, "id": self.ctx.engine_id, "stats": self.statistics()}
        if op == "reopen":
            stream = self._open(self.config["file"])
            self._close_stream()
            self._stream = stream
            return {"reopened": self.config["file"]}
        return super().handle_request(cmd)

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Close the log file (stderr is left open)."""
        self._close_stream()


ENGINE = AccessLog
