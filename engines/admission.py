"""Per-application admission control: what one app may make the daemon hold.

How this works: the frontend asks :class:`Admission` before it takes a CALL from
an app's submit ring. Three quotas make the call wait (back-pressure: the
descriptor stays in the ring, the ring fills, and the app's libmrpc waits on the
full ring): calls in flight, completions waiting for room in the app's
completion ring, and bytes of marshalled messages the daemon holds for the app.

The byte quota is enforced while marshalling: the marshaller gets what is left
of the quota as its size limit and stops before copying past it
(:class:`~libmrpc.wire.marshal.TooBig` says how many bytes the message needs at
least). The call then waits until that much is free; only a message that alone
is larger than the whole quota fails, with RESOURCE_EXHAUSTED. Waiting costs no
repeated work: the call is retried only once enough bytes are free.

Numbers from apps are clamped here too: a deadline in the past fails the call
at once, one more than :data:`MAX_TIMEOUT` ahead means "no deadline", and every
deadline handed on fits the u64 fields of descriptors and frames.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from mrpcd.engine import DEFAULT_LIMITS, AppPort, LimitsConfig

log = logging.getLogger(__name__)
MAX_TIMEOUT = 365 * 86400.0  # seconds; a deadline further ahead is treated as none
U64_MAX = (1 << 64) - 1


def app_deadline(deadline_ns: int, now: float) -> float | None:
    """An app's absolute deadline (CLOCK_MONOTONIC ns, 0 = none) as clock seconds.

    None when there is none or it is more than a year ahead; a past deadline is
    returned as is (the caller fails the call with DEADLINE_EXCEEDED)."""
    if not deadline_ns:
        return None
    deadline = deadline_ns / 1e9
    if deadline - now > MAX_TIMEOUT:
        return None
    return deadline


def deadline_field(deadline: float | None) -> int:
    """A deadline as the u64 ``deadline_ns`` of a completion descriptor (0 = none)."""
    if deadline is None or not math.isfinite(deadline):
        return 0
    return min(max(1, int(deadline * 1e9)), U64_MAX)


_QUOTA = {
    "calls": "limits.calls_in_flight",
    "backlog": "limits.completion_backlog",
    "bytes": "limits.bytes_in_flight",
}


class Admission:
    """The quotas of one app; used only from its runtime thread."""

    def __init__(self, app: AppPort, limits: Any = None) -> None:
        self.app = app
        self.limits: LimitsConfig = limits if limits is not None else DEFAULT_LIMITS
        self.need = 0  # bytes a waiting call needs free, at least (0: none waits for bytes)
        self.blocked: str | None = None  # why CALLs wait now: "calls", "backlog", "bytes"
        self.holds = {
            "calls": 0,
            "backlog": 0,
            "bytes": 0,
        }  # times CALLs started to wait, by reason
        self.too_big = 0  # messages refused as larger than the whole byte quota

    # ------------------------------------------------------------------ calls

    def wait_reason(self, backlog: int) -> str | None:
        """Why the next CALL must wait now, or None when it may go ahead."""
        app, lim = self.app, self.limits
        reason = None
        if len(app.inflight) >= lim.calls_in_flight:
            reason = "calls"
        elif backlog >= lim.completion_backlog:
            reason = "backlog"
        elif (
            self.need
            and app.bytes_inflight
            and lim.bytes_in_flight - app.bytes_inflight < self.need
        ):
            reason = "bytes"
        if reason is not None and reason != self.blocked:
            self.holds[reason] += 1
            if self.holds[reason] == 1:  # the first time only: a hostile app must not flood the log
                log.info(
                    "app %r (pid %d) reached its quota (%s); its calls wait in its submit "
                    "ring until earlier ones complete",
                    app.name,
                    app.pid,
                    _QUOTA[reason],
                )
        self.blocked = reason
        return reason

    def size_limit(self, max_message_size: int) -> int:
        """The largest image the next message may marshal to right now."""
        return max(0, min(max_message_size, self.limits.bytes_in_flight - self.app.bytes_inflight))

    def must_wait(self, at_least: int) -> bool:
        """A message needing ``at_least`` bytes did not fit: wait (True) or fail (False)?"""
        if self.app.bytes_inflight and at_least <= self.limits.bytes_in_flight:
            self.need = at_least
            return True
        self.need = 0
        self.too_big += 1
        return False

    def too_big_details(self, what: str, at_least: int) -> str:
        return (
            f"{what} needs at least {at_least} bytes, more than app {self.app.name!r} may have "
            f"in flight (limits.bytes_in_flight = {self.limits.bytes_in_flight}); send a smaller "
            "message or ask the operator to raise the limit"
        )

    def admit_call(self, call_id: int, size: int) -> None:
        app = self.app
        self.need = 0
        app.inflight.add(call_id)
        app.call_bytes[call_id] = size
        app.bytes_inflight += size

    def release_call(self, call_id: int) -> None:
        app = self.app
        app.inflight.discard(call_id)
        app.bytes_inflight -= app.call_bytes.pop(call_id, 0)

    # ------------------------------------------------------------------ server side

    def serving_full(self) -> bool:
        """The app holds as many unanswered inbound calls as it may."""
        return len(self.app.server_calls) >= self.limits.calls_in_flight

    def admit_reply(self, token: int, size: int) -> None:
        app = self.app
        app.reply_bytes[token] = size
        app.bytes_inflight += size

    def release_reply(self, token: int) -> None:
        app = self.app
        app.bytes_inflight -= app.reply_bytes.pop(token, 0)
