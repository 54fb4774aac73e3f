"""What the daemon knows about one registered application, and the router.

:class:`AppState` is the daemon's record of an app; engines see it only as an
:class:`~mrpcd.engine.AppPort` (``ctx.port``): rings, heaps, bindings and the
in-flight tables, plus the thread-safe :meth:`AppState.deliver` through which
the network side hands items to the app's datapath. The datapath and the
runtime that owns it are the daemon's business. :class:`Router` (engines see a
:class:`~mrpcd.engine.RouterPort`) routes inbound calls to server apps.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from libmrpc._heap import Heap
from libmrpc._shm import DaemonRegions, notify
from libmrpc.status import RpcError, StatusCode
from libmrpc.wire.ring import RingConsumer, RingProducer
from mrpcd.engine import Binding, ConnSpec, Rpc

if TYPE_CHECKING:
    from mrpcd.datapath import Datapath
    from mrpcd.runtime import Runtime

log = logging.getLogger(__name__)


class AppState:
    def __init__(
        self,
        app_id: int,
        name: str,
        pid: int,
        uid: int,
        regions: DaemonRegions,
        submit_efd: int,
        complete_efd: int,
    ) -> None:
        self.app_id = app_id
        self.name = name
        self.pid = pid
        self.uid = uid
        self.regions = regions
        layout = regions.layout
        ctl = memoryview(regions.ctl)
        self.submit = RingConsumer(
            ctl[: layout.ring_size], layout.ring_slots, name=f"{name} submit ring"
        )
        self.complete = RingProducer(
            ctl[layout.ring_size :], layout.ring_slots, name=f"{name} completion ring"
        )
        self.submit_efd = submit_efd
        self.complete_efd = complete_efd
        self.send_view = memoryview(regions.send)  # read-only
        self.recv_view = memoryview(regions.recv)
        self.recv_heap = Heap(self.recv_view, name=f"receive heap of {name!r}")
        self.bindings: list[Binding] = []
        self.schema_texts: list[Any] = []  # per slot: the texts bound (a hot restart rebinds)
        self.conns: dict[int, ConnSpec] = {}
        self.served: dict[str, Binding] = {}
        self.datapath: Datapath | None = None
        self.runtime: Runtime | None = None
        self.server_calls: dict[int, Rpc] = {}
        self.inflight: set[int] = set()
        # admission accounting, kept by the frontend (engines/admission.py): bytes of
        # marshalled images the daemon holds for this app, per call id and per reply token
        self.call_bytes: dict[int, int] = {}
        self.reply_bytes: dict[int, int] = {}
        self.bytes_inflight = 0
        self._tokens = itertools.count(1)
        self.lock = threading.Lock()
        self._heap_lock = threading.Lock()  # the receive heap: its runtime and the ingress's
        # the network-side end of the datapath (the transport's rx_in): deliver() appends
        # from any thread, the owning runtime pops
        self.inbox: deque[Rpc] = deque()
        self.waker: Callable[[], None] = _nothing  # wakes the owning runtime (set by the daemon)
        self.on_broken: Callable[[AppState, str], None] | None = None
        self.closed = False
        self.registered_at = 0.0
        self.counters = {"calls": 0, "replies": 0, "served": 0, "errors": 0}

    def next_token(self) -> int:
        return next(self._tokens)

    def wake_app(self) -> None:
        if self.complete.consumer_sleeping():
            notify(self.complete_efd)

    @property
    def reads_content(self) -> bool:
        """A policy that reads message content is spliced into this app's datapath."""
        dp = self.datapath
        return dp is not None and dp.content

    def deliver(self, rpc: Rpc) -> None:
        """From any thread: hand ``rpc`` to this app's datapath and wake its runtime.

        On the owning runtime itself (a single runtime, or the ingress sharing it)
        the item enters the chain at once, so the frontend sees it in this round;
        splices run on that thread too, so the deque read here is current."""
        runtime, dp = self.runtime, self.datapath
        if dp is not None and runtime is not None and runtime.in_runtime():
            dp.deliver_local(rpc)
            return
        self.inbox.append(rpc)
        self.waker()

    def recv_alloc(self, size: int) -> int:
        with self._heap_lock:
            return self.recv_heap.alloc(size)

    def recv_free(self, offset: int) -> None:
        with self._heap_lock:
            self.recv_heap.free(offset)

    def disconnect(self, reason: str) -> None:
        self.closed = True
        if self.on_broken is not None:
            self.on_broken(self, reason)

    def describe(self) -> dict[str, Any]:
        dp = self.datapath
        return {
            "app_id": self.app_id,
            "name": self.name,
            "pid": self.pid,
            "uid": self.uid,
            "schemas": [
                {"slot": b.slot, "hash": b.schema_hash, "services": list(b.services)}
                for b in self.bindings
            ],
            "serves": sorted(self.served),
            "connections": [
                {"conn_id": c.conn_id, "addr": c.addr, "schema_slot": c.slot}
                for c in self.conns.values()
            ],
            "inflight_calls": len(self.inflight),
            "serving_calls": len(self.server_calls),
            "inflight_bytes": self.bytes_inflight,
            "datapath": dp.describe() if dp else [],
            "runtime": self.runtime.name if self.runtime else None,
            "recv_heap": _stats(self.recv_heap),
            "counters": dict(self.counters),
        }

    def close(self) -> None:
        """Drop mappings (views still held elsewhere keep theirs alive until released)."""
        self.closed = True
        self.recv_heap.closed = True
        self.submit.release()  # the rings' views pin the ctl mapping (and its memfd)
        self.complete.release()
        for view in (self.send_view, self.recv_view):
            try:
                view.release()
            except (BufferError, ValueError):
                pass
        for what, m in (
            ("ctl", self.regions.ctl),
            ("send", self.regions.send),
            ("recv", self.regions.recv),
        ):
            try:
                m.close()
            except (
                BufferError
            ):  # a view still in use (e.g. a zero-copy send): unmapped when it goes
                log.info(
                    "app %r (pid %d): %s region still in use at close; it is unmapped when "
                    "its last view is released",
                    self.name,
                    self.pid,
                    what,
                )
        for fd in (self.submit_efd, self.complete_efd):
            try:
                os.close(fd)
            except OSError:
                pass


def _nothing() -> None:
    pass


def _stats(heap: Heap) -> dict[str, int]:
    s = heap.statistics()
    return {
        "size": s.size,
        "used": s.used,
        "allocations": s.allocations,
        "largest_free": s.largest_free,
    }


@dataclass(eq=False, slots=True)
class ServiceOwner:
    """Who owns a service name at this daemon: the uid that served it last (kept after it exits)."""

    uid: int
    app_name: str
    pid: int
    app_id: int
    since: float


class Router:
    """Daemon-wide routing: which server app serves which service, and who owns each name."""

    MAX_IDLE_OWNERS_PER_UID = 4096  # records of names a uid no longer serves; the oldest go first

    def __init__(self, daemon_name: str) -> None:
        self.daemon_name = daemon_name
        self.services: dict[str, AppState] = {}
        self.owners: dict[str, ServiceOwner] = {}
        self.lock = threading.Lock()

    def bind(
        self,
        app: AppState,
        binding: Binding,
        services: list[str],
        authorize: Callable[[str, int | None, int | None], bool] | None = None,
    ) -> list[tuple[str, AppState]]:
        """Route ``services`` to ``app``: all or none.

        ``authorize(service, owner_uid, holder_uid)`` raises RpcError to refuse, and
        returns True if ``app`` may take the service over from the app serving it
        now (else that is ALREADY_EXISTS). Returns the (service, app) pairs taken over.
        """
        with self.lock:
            taken = []
            for svc in services:
                other = self.services.get(svc)
                holder = (
                    other if other is not None and other is not app and not other.closed else None
                )
                owner = self.owners.get(svc)
                take = False
                if authorize is not None:
                    take = authorize(
                        svc, owner.uid if owner else None, holder.uid if holder else None
                    )
                if holder is not None and not take:
                    raise RpcError(
                        StatusCode.ALREADY_EXISTS,
                        f"service {svc} is already served by app {holder.name!r} "
                        f"(pid {holder.pid}) at this daemon",
                    )
                if holder is not None:
                    taken.append((svc, holder))
            now = time.time()
            for svc in services:
                self.services[svc] = app
                app.served[svc] = binding
                self.owners.pop(svc, None)  # re-inserted last: dict order is age order
                self.owners[svc] = ServiceOwner(app.uid, app.name, app.pid, app.app_id, now)
            self._trim_owners(app.uid)
        return taken

    def _trim_owners(self, uid: int) -> None:
        idle = [svc for svc, o in self.owners.items() if o.uid == uid and svc not in self.services]
        for svc in idle[: max(0, len(idle) - self.MAX_IDLE_OWNERS_PER_UID)]:
            del self.owners[svc]

    def unbind_app(self, app: AppState) -> None:
        """Stop routing to ``app``; the names stay owned by its uid."""
        with self.lock:
            for svc in [s for s, a in self.services.items() if a is app]:
                del self.services[svc]

    def check_hello(
        self, schema_hash: str, services: frozenset[str] | list[str], client: str
    ) -> None:
        """Refuse a connection whose schema differs from a bound server's.

        The refusal goes to an unauthenticated peer: it names the peer's own
        service only (no schema hash, app name or host of this daemon); the
        details are logged here."""
        with self.lock:
            for svc in services:
                app = self.services.get(svc)
                if app is None:
                    continue
                bound = app.served[svc].schema_hash
                if bound != schema_hash:
                    log.warning(
                        "refused peer %s: schema mismatch for service %s: it uses schema %s, "
                        "server app %r uses %s",
                        client,
                        svc,
                        schema_hash,
                        app.name,
                        bound,
                    )
                    raise RpcError(
                        StatusCode.FAILED_PRECONDITION,
                        f"schema mismatch for service {svc}: the server was built from different "
                        f".proto files; build both applications from the same .proto files",
                    )

    def route(
        self, schema_hash: str, method_id: int, services: frozenset[str] | list[str]
    ) -> tuple[AppState, Binding, Any]:
        """Find the server app and method for an inbound call, or raise RpcError.

        O(1) in the number of services the peer announced: method id -> the
        schema's method -> its service -> the app serving it here."""
        module = self._module_for(schema_hash)
        if module is None:
            raise RpcError(
                StatusCode.UNAVAILABLE,
                f"no server application serves the called service at daemon "
                f"{self.daemon_name}; start the server app",
            )
        methods = module.METHODS
        if not 0 <= method_id < len(methods):
            raise RpcError(
                StatusCode.UNIMPLEMENTED,
                f"method id {method_id} does not exist in schema {schema_hash}",
            )
        method = methods[method_id]
        svc = method.service
        if svc not in services:
            raise RpcError(
                StatusCode.FAILED_PRECONDITION,
                f"service {svc} was not announced in this connection's HELLO",
            )
        with self.lock:
            app = self.services.get(svc)
            binding = app.served.get(svc) if app is not None and not app.closed else None
        if app is None or binding is None:
            raise RpcError(
                StatusCode.UNAVAILABLE,
                f"no server application serves {svc} at daemon {self.daemon_name}; "
                f"start the server app",
            )
        if binding.schema_hash != schema_hash:
            raise RpcError(
                StatusCode.FAILED_PRECONDITION,
                f"schema mismatch for service {svc}: the server was built from different "
                f".proto files; build both applications from the same .proto files",
            )
        return app, binding, method

    def _module_for(self, schema_hash: str) -> ModuleType | None:
        """A generated module of ``schema_hash`` that some app here bound (cached:
        one hash, one schema); None if no app serves it. A miss walks this
        daemon's own services, never a peer's list."""
        cache: dict[str, ModuleType] = self.__dict__.setdefault("_modules", {})
        module = cache.get(schema_hash)
        if module is not None:
            return module
        with self.lock:
            for svc, app in self.services.items():
                binding = app.served.get(svc)
                if binding is not None and binding.schema_hash == schema_hash:
                    if len(cache) < 1024:
                        cache[schema_hash] = binding.module
                    return binding.module
        return None
