"""What the daemon lends engines: an application's port, routing, polling, settings.

Engines are typed against these protocols and never see the daemon's own
objects (``mrpcd.appstate.AppState`` implements :class:`AppPort`,
``mrpcd.appstate.Router`` implements :class:`RouterPort`, the runtime's poller
implements :class:`Poller`). Everything here is either read-only for engines
or says which thread may call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mrpcd.engine.settings import DEFAULT_LIMITS, DEFAULT_TCP, LimitsConfig, TcpConfig

if TYPE_CHECKING:
    from libmrpc._heap import Heap
    from libmrpc.wire.ring import RingConsumer, RingProducer
    from mrpcd.engine.core import Rpc
    from mrpcd.engine.items import Binding, ConnSpec

DEFAULT_MAX_METADATA = 8 << 10


class AppPort(Protocol):
    """One registered application as its datapath's engines see it.

    Rings, heaps, bindings and the in-flight tables; no datapath, no runtime.
    Everything but :meth:`deliver`, :meth:`recv_alloc`, :meth:`recv_free`,
    :attr:`closed` and the read-only identity fields is touched only from the
    runtime that owns the app's datapath.
    """

    name: str
    pid: int
    uid: int
    submit: RingConsumer
    complete: RingProducer
    send_view: memoryview  # the app's send heap, read-only
    recv_view: memoryview  # the app's receive heap (the app maps it read-only)
    recv_heap: Heap
    bindings: list[Binding]
    conns: dict[int, ConnSpec]
    server_calls: dict[int, Rpc]  # inbound calls delivered, not yet answered
    inflight: set[int]  # call ids of the app's outbound calls in flight
    call_bytes: dict[int, int]
    reply_bytes: dict[int, int]
    bytes_inflight: int
    counters: dict[str, int]

    @property
    def closed(self) -> bool: ...

    @property
    def reads_content(self) -> bool:
        """A policy that reads message content is spliced into this app's datapath
        (inbound calls then land in daemon-private memory first)."""
        ...

    def next_token(self) -> int:
        """A fresh id for an inbound call (thread-safe)."""
        ...

    def wake_app(self) -> None:
        """Signal the app that completions wait (if it sleeps)."""
        ...

    def deliver(self, rpc: Rpc) -> None:
        """Hand an item from the network side to this app's datapath (thread-safe).

        An inbound CALL, a CANCEL of one, or a RECLAIM of a reply's memory; it
        enters at the transport end of the datapath and its runtime is woken.
        """
        ...

    def recv_alloc(self, size: int) -> int:
        """Allocate in the receive heap (thread-safe); raises ``HeapExhausted``."""
        ...

    def recv_free(self, offset: int) -> None:
        """Free a receive-heap block (thread-safe); raises ValueError for a bad offset."""
        ...

    def disconnect(self, reason: str) -> None:
        """The app broke its side of the protocol (corrupt rings): cut it off."""
        ...


class RouterPort(Protocol):
    """Daemon-wide routing of inbound calls to server apps (thread-safe)."""

    def check_hello(
        self, schema_hash: str, services: frozenset[str] | list[str], client: str
    ) -> None:
        """Raise RpcError when a peer's schema differs from a bound server's."""
        ...

    def route(
        self, schema_hash: str, method_id: int, services: frozenset[str] | list[str]
    ) -> tuple[AppPort, Binding, Any]:
        """(server app, its binding, the method) for an inbound call, or raise RpcError."""
        ...


class Poller(Protocol):
    """The owning runtime's epoll set; only used from that runtime's thread."""

    def register(self, fd: int, events: int, handler: Callable[[int], None]) -> None: ...
    def modify(self, fd: int, events: int) -> None: ...
    def unregister(self, fd: int) -> None: ...


@dataclass(frozen=True)
class Services:
    """Daemon-wide, read-only services and settings every engine may use."""

    daemon_name: str = "mrpcd"
    max_message_size: int = 256 << 20
    max_metadata_size: int = DEFAULT_MAX_METADATA
    tcp: TcpConfig = DEFAULT_TCP
    limits: LimitsConfig = DEFAULT_LIMITS
    router: RouterPort | None = None
    metrics_registry: Any = field(default=None, compare=False)  # prometheus CollectorRegistry
