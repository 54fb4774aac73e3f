"""What one peer connection may cost this daemon, and the timers that enforce it.

Peer daemons are untrusted. Each inbound connection accounts for the calls it
has in flight (landed in a server app's receive heap, or being received, and
not yet answered): how many, and how many receive-heap bytes they reserve. A
call beyond either limit is refused on its own with RESOURCE_EXHAUSTED; the
connection stays open. The accounting lives on the connection and dies with it.

Timers (checked by the owning engine every ``tick`` seconds, via ``next_timer``):

    handshake     inbound, no HELLO yet, open longer than handshake_timeout
    header        a frame header half received for longer than header_timeout
    body stall    a frame body without a new byte for body_stall_timeout, or
                  slower on average than min_body_rate after that long (a drip)
    write stall   queued output the peer has not read for write_stall_timeout
    idle          no frame and no call in flight for idle_timeout (outbound
                  connections close themselves at half of it, before the peer
                  does; the next call reopens them)

Each one closes the connection; closing frees the body being received.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engines.tcp_conn import ConnState
from libmrpc.status import StatusCode
from libmrpc.wire.errors import WireError

log = logging.getLogger(__name__)

PONG_QUEUE_MAX = 64 << 10  # a PING is ignored while this much output waits for the peer
MAX_PINGS_PER_SECOND = 1000  # more from one connection is a flood: it is closed


@dataclass(frozen=True, slots=True)
class PeerLimits:
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_stall_timeout: float = 30.0
    idle_timeout: float = 300.0
    write_stall_timeout: float = 30.0
    min_body_rate: int = 64 << 10  # bytes per second a body must average after body_stall_timeout
    max_send_queue: int = 8 << 20
    max_calls: int = 4096
    max_reserved: int = 256 << 20
    max_inbound: int = 4096
    max_per_ip: int = 512

    @classmethod
    def from_config(cls, tcp: Any, max_message_size: int) -> PeerLimits:
        """From a TcpConfig (fields missing on an older one keep their defaults)."""
        d = cls()

        def g(name: str, default: Any) -> Any:
            return getattr(tcp, name, default)

        reserved = g("max_reserved_per_connection", None)
        return cls(
            handshake_timeout=g("handshake_timeout", d.handshake_timeout),
            header_timeout=g("header_timeout", d.header_timeout),
            body_stall_timeout=g("body_stall_timeout", d.body_stall_timeout),
            idle_timeout=g("idle_timeout", d.idle_timeout),
            write_stall_timeout=g("write_stall_timeout", d.write_stall_timeout),
            min_body_rate=g("min_body_rate", d.min_body_rate),
            max_send_queue=g("max_send_queue", d.max_send_queue),
            max_calls=g("max_calls_per_connection", d.max_calls),
            max_reserved=reserved if reserved is not None else max_message_size,
            max_inbound=g("max_inbound_connections", d.max_inbound),
            max_per_ip=g("max_inbound_per_ip", d.max_per_ip),
        )

    @property
    def tick(self) -> float:
        """How often the timers are checked: a quarter of the shortest, 20 ms..1 s."""
        shortest = min(
            self.handshake_timeout,
            self.header_timeout,
            self.body_stall_timeout,
            self.idle_timeout / 2,
            self.write_stall_timeout,
        )
        return min(1.0, max(0.02, shortest / 4))


def admit(
    conn: Any, app: Any, wire_id: int, size: int, limits: PeerLimits
) -> tuple[StatusCode, str] | None:
    """Count an inbound call against its connection; a refusal (status, details) or None."""
    with conn.lock:
        if wire_id in conn.rx_calls:
            return (
                StatusCode.INVALID_ARGUMENT,
                f"call id {wire_id} is already in flight on this connection",
            )
        if len(conn.rx_calls) >= limits.max_calls:
            return StatusCode.RESOURCE_EXHAUSTED, (
                f"{len(conn.rx_calls)} calls are in flight on this connection, the limit "
                f"(tcp.max_calls_per_connection at the server daemon) is {limits.max_calls}; "
                f"retry when some have finished"
            )
        if conn.reserved + size > limits.max_reserved:
            return StatusCode.RESOURCE_EXHAUSTED, (
                f"a {size}-byte call would raise this connection's receive-heap reservation "
                f"to {conn.reserved + size} bytes, above the limit of {limits.max_reserved} "
                f"(tcp.max_reserved_per_connection at the server daemon); retry later"
            )
        conn.rx_calls[wire_id] = (app, size)
        conn.reserved += size
    return None


def settle(conn: Any, wire_id: int) -> None:
    """The call was answered (or refused, or its server left): return its reservation."""
    with conn.lock:
        entry = conn.rx_calls.pop(wire_id, None)
        if entry is not None:
            conn.reserved -= entry[1]


def reap_gone_apps(conn: Any) -> None:
    """Return the reservations of calls whose server app has exited."""
    if not conn.rx_calls:
        return
    with conn.lock:
        gone = [w for w, (app, _) in conn.rx_calls.items() if getattr(app, "closed", False)]
        for w in gone:
            conn.reserved -= conn.rx_calls.pop(w)[1]


def count_ping(conn: Any) -> None:
    """Count a PING; raise WireError (the connection closes) on a flood."""
    now = conn.last_in
    if now - conn.ping_window >= 1.0:
        conn.ping_window, conn.pings = now, 0
    conn.pings += 1
    if conn.pings > MAX_PINGS_PER_SECOND:
        raise WireError(f"PING flood: more than {MAX_PINGS_PER_SECOND} PINGs within a second")


def overdue(conn: Any, now: float, limits: PeerLimits) -> str | None:
    """Why ``conn`` should be closed now, or None."""
    if not conn.open:
        return None
    asm = conn.assembler
    if conn.state is ConnState.AWAIT_HELLO and now - conn.opened > limits.handshake_timeout:
        return f"no HELLO within {limits.handshake_timeout:g}s"
    if conn.read_paused:
        pass  # we stopped reading (back-pressure): a half-read frame is not the peer's stall
    elif asm.in_body:
        if now - conn.last_in > limits.body_stall_timeout:
            return (
                f"a frame body stalled: no byte for {limits.body_stall_timeout:g}s "
                f"({asm.body_left} bytes still missing)"
            )
        slow = now - conn.frame_at - limits.body_stall_timeout
        got = asm.body_received_so_far
        if slow > 0 and got < slow * limits.min_body_rate:
            return (
                f"a frame body trickles in: {got} bytes in {now - conn.frame_at:.1f}s, "
                f"slower than tcp.min_body_rate ({limits.min_body_rate} bytes/s)"
            )
    elif asm.partial and now - conn.frame_at > limits.header_timeout:
        return f"a frame header stayed incomplete for more than {limits.header_timeout:g}s"
    if conn.out_since is not None and now - conn.out_since > limits.write_stall_timeout:
        return (
            f"the peer read none of {len(conn.sendq)} queued bytes for "
            f"{limits.write_stall_timeout:g}s"
        )
    busy = conn.calls if conn.outbound else conn.rx_calls
    idle = limits.idle_timeout / 2 if conn.outbound else limits.idle_timeout
    if not busy and not asm.partial and now - conn.last_frame > idle:
        return f"idle for {idle:g}s"
    return None


class RateLimitedLog:
    """Log a recurring event at most once per ``every`` seconds, with a count."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._next = 0.0
        self._count = 0

    def __call__(self, now: float, msg: str, *args: Any) -> None:
        self._count += 1
        if now >= self._next:
            log.warning(msg + " (%d such events since the last report)", *args, self._count)
            self._count = 0
            self._next = now + self.every
