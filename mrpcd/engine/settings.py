"""The daemon settings engines read: the ``tcp.*`` and ``limits.*`` sections.

They are defined here, in the engine API, so that engines are typed against
them without importing the daemon's config loader (``mrpcd.config`` builds
them from YAML, environment and defaults; ``deploy/mrpcd.yaml`` documents
every key).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TcpConfig:
    nodelay: bool
    connect_timeout: float  # seconds
    zero_copy_min: int  # bulk fields at least this long go out zero-copy
    sndbuf: int | None  # SO_SNDBUF bytes; None = kernel default
    rcvbuf: int | None  # SO_RCVBUF bytes; None = kernel default
    # --- limits on peers (hostile input); see deploy/mrpcd.yaml ---
    max_connections_per_app: int = 64  # distinct (host, port, schema) targets one app may connect
    max_inbound_connections: int = 4096  # accepted peer connections at once, all sources
    max_inbound_per_ip: int = 512  # accepted peer connections at once from one address
    handshake_timeout: float = 10.0  # seconds for an inbound peer to send its HELLO
    header_timeout: float = 10.0  # seconds a frame header may stay half received
    body_stall_timeout: float = 30.0  # seconds a frame body may go without a byte
    idle_timeout: float = 300.0  # seconds without frames or calls before a connection closes
    write_stall_timeout: float = 30.0  # seconds queued output may go unread by the peer
    min_body_rate: int = (
        64 << 10
    )  # bytes/s a frame body must average once body_stall_timeout passed
    max_send_queue: int = 8 << 20  # bytes queued to one peer before reading its calls pauses
    max_calls_per_connection: int = 4096  # calls one inbound connection may have unanswered
    max_reserved_per_connection: int | None = None  # receive-heap bytes; None = max_message_size


@dataclass(frozen=True)
class LimitsConfig:
    """Per-application admission quotas (see deploy/mrpcd.yaml, ``limits``)."""

    calls_in_flight: int  # calls an app may have in flight (and server calls unanswered)
    bytes_in_flight: int  # bytes of marshalled requests/replies the daemon holds per app
    completion_backlog: int  # completions waiting for room in an app's completion ring
    marshal_work: int  # records and blobs per message (marshal and validate)
    slice_us: int  # microseconds one app's frontend may run per runtime round


DEFAULT_TCP = TcpConfig(
    nodelay=True, connect_timeout=3.0, zero_copy_min=2048, sndbuf=None, rcvbuf=None
)
DEFAULT_LIMITS = LimitsConfig(
    calls_in_flight=4096,
    bytes_in_flight=256 << 20,
    completion_backlog=4096,
    marshal_work=1 << 18,
    slice_us=2000,
)
