"""The TCP transport: ``tcp`` (per application) and ``tcp-ingress`` (per daemon).

``tcp`` is the last engine of an application's datapath. tx: it marshals each
call (and each of a server app's replies) once, straight from the app's send
heap — small records copied into a header buffer, bulk fields as zero-copy
segments — and queues the frames on the connection; all frames queued in one
round go out in one ``sendmsg``. rx: replies land directly in the app's
receive heap and are validated before the app hears of them.

``tcp-ingress`` (in :mod:`engines.tcp_ingress`, exported here as ``INGRESS``)
owns the listening socket and inbound connections; it checks each peer's
handshake, routes inbound calls to the server app and lands them in that app's
receive heap.

Every call gets exactly one outcome: a reply, an error frame, a local error
(connection refused, deadline, connection lost) — never none, never two.

Peers are untrusted (see :mod:`engines.tcp_limits`): a body the daemon will
not keep is skipped without storing it, every connection's reservations and
queues are bounded, stalled and idle connections are timed out, and host names
are resolved off the runtime thread (:mod:`engines.tcp_resolve`). An app's
connections to one (host, port, schema) share one TCP connection.

Wire features (:mod:`engines.tcp_features`): the HELLO advertises
``WIRE_FEATURES``, the HELLO_ACK tells the peer's, and each connection uses what
both have (BATCH frames, :mod:`engines.tcp_conn`). ``load_state`` (a live
upgrade or rollback) announces a changed set on every live connection with a
FEATURES frame. It also completes calls the ``local`` transport
(:mod:`engines.local`) handed to a server app of this daemon (``post``), so an
app switched back from ``local`` to ``tcp`` loses none.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import socket
import sys
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from engines import handover_calls, local_calls, tcp_resolve
from engines import tcp_features as wf
from engines.local_calls import LocalOrigin
from engines.tcp_conn import (
    Conn,
    ConnState,
    OversizeReply,
    conn_settled,
    connect_nonblocking,
    export_conn,
    import_conn,
)
from engines.tcp_ingress import TcpIngress, answer_ping, free_landed
from engines.tcp_limits import PeerLimits, overdue
from libmrpc.status import StatusCode
from libmrpc.wire import metadata as md
from libmrpc.wire.errors import WireError
from libmrpc.wire.frames import (
    CALL,
    CANCEL,
    DISCARD,
    ERROR,
    FEATURES,
    FRAME_NAMES,
    GOAWAY,
    HELLO,
    HELLO_ACK,
    MAX_HELLO_SERVICES,
    METADATA,
    PING,
    PONG,
    PROTOCOL_VERSION,
    REPLY,
    Body,
    FrameHeader,
    clamp_timeout_us,
    decode_json_body,
    encode_header,
    encode_json_frame,
)
from libmrpc.wire.heap import HeapExhausted
from mrpcd.engine import (
    AppPort,
    ConnSpec,
    EngineContext,
    Landed,
    Rpc,
    RpcKind,
    RxCall,
    TransportEngine,
    TxCall,
    TxReply,
)

log = logging.getLogger(__name__)
FAILED_RETRY = 1.0  # seconds a failed connection keeps failing calls fast before a retry
Target = tuple[str, int, int]  # (host, port, schema slot): one shared connection each


def format_target(key: Target) -> str:
    return f"[{key[0]}]:{key[1]}" if ":" in key[0] else f"{key[0]}:{key[1]}"


def _status(value: Any, default: StatusCode) -> StatusCode:
    """A status code from a peer, or ``default`` if it is not a valid one."""
    try:
        code = StatusCode(int(value))
    except (TypeError, ValueError, OverflowError):
        return default
    return code if code is not StatusCode.OK else default


def _inbound_call(state: object) -> RxCall | None:
    """The inbound call a REPLY answers (a server app's reply or a receive-side
    refusal), or None for a send-side error on its way back to the app."""
    if isinstance(state, TxReply):
        return state.call
    return state if isinstance(state, RxCall) else None


class TcpTransport(TransportEngine):
    NAME = "tcp"
    VERSION = 2  # 2: wire features (FEATURES, BATCH), see engines.tcp_features
    WIRE_FEATURES: frozenset[str] = wf.WIRE_FEATURES

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        if ctx.port is None or ctx.poller is None:
            raise ValueError(
                "the tcp transport serves one application: it needs a port and a poller"
            )
        svc = ctx.services
        self.app: AppPort = ctx.port
        self.poller = ctx.poller
        self.tcp = svc.tcp
        self.max_message_size = svc.max_message_size
        self.max_metadata_size = svc.max_metadata_size
        self.daemon_name = svc.daemon_name
        self.limits = PeerLimits.from_config(self.tcp, self.max_message_size)
        self.conns: dict[Target, Conn] = {}
        self.retired: set[Conn] = set()  # told GOAWAY, replaced; closed once their calls are done
        self.pending: dict[int, tuple[Rpc, Conn]] = {}
        # calls whose zero-copy segments (views of the app's send heap) are still
        # queued: wire id -> (conn, first, end queue position); see _unpin
        self.unsent: dict[int, tuple[Conn, int, int]] = {}
        self.deadlines: list[tuple[float, int]] = []
        self.failed: dict[Target, tuple[float, StatusCode, str]] = {}
        self.dirty: set[Conn] = set()
        # calls waiting for their host name to resolve: target -> (give-up time, calls)
        self.resolving: dict[Target, tuple[float, list[Rpc]]] = {}
        self._resolved: deque[Target] = deque()  # appended by resolver threads
        self._next_sweep = 0.0
        self._wire_ids = itertools.count(1)
        # calls to a server app of this daemon (engines.local_calls): started only by
        # the local transport, completed by either after a switch
        self.local: LocalOrigin | None = None
        self.replies: deque[Rpc] = deque()  # the server apps' answers, posted from any runtime
        self._handed_over = False  # decompose() gave local and replies to a successor
        self.counters = {
            "calls_sent": 0,
            "replies_received": 0,
            "replies_sent": 0,
            "errors": 0,
            "late_replies": 0,
            "deadline_expired": 0,
            "unsent_bytes_copied": 0,
        }

    # ------------------------------------------------------------------ tx

    def do_work(self) -> int:
        n = 0
        tx_in, inbox, rx_out = self.tx_in, self.rx_in, self.rx_out
        while tx_in:
            self._send(tx_in.popleft())
            n += 1
        while inbox:  # what the daemon delivered to the app from the network side
            rx_out.append(inbox.popleft())
            n += 1
        replies = self.replies
        while replies:  # answers to local calls
            local_calls.complete(self, replies.popleft())
            n += 1
        while self._resolved:  # host names resolved meanwhile: their calls go now
            entry = self.resolving.pop(self._resolved.popleft(), None)
            for rpc in entry[1] if entry is not None else ():
                self._send(rpc)
                n += 1
        if self.dirty:
            dirty, self.dirty = self.dirty, set()
            for conn in dirty:  # a flush may close a connection (and touch self.dirty)
                conn.flush()
        now = self.ctx.clock.now()
        if self.deadlines and self.deadlines[0][0] <= now:
            n += self._expire()
        if now >= self._next_sweep and (self.conns or self.resolving or self.retired):
            self._next_sweep = now + self.limits.tick
            n += self._sweep(now)
        return n

    def _send(self, rpc: Rpc) -> None:
        try:
            if rpc.kind is RpcKind.CALL:
                self._send_call(rpc)
            elif rpc.kind is RpcKind.REPLY:
                self._send_reply(rpc)
            elif rpc.kind is RpcKind.CANCEL:
                if isinstance(rpc._state, Rpc):
                    self.cancel(rpc._state)
            else:
                self.rx_out.append(rpc)
        except Exception:
            log.exception("tcp: failed to send %s %d of %r", rpc.kind.name, rpc.call_id, rpc.app)
            if rpc.kind is RpcKind.CALL:
                self._fail(
                    rpc, StatusCode.INTERNAL, "mrpcd failed to send the call (see daemon log)"
                )

    def _fail(self, rpc: Rpc, code: StatusCode, details: str) -> None:
        self.counters["errors"] += 1
        self.rx_out.append(rpc.error_reply(code, details))

    def _conn_for(
        self, spec: ConnSpec, binding: Any, rpc: Rpc
    ) -> Conn | tuple[StatusCode, str] | None:
        """The open connection for ``spec``, a local error, or None: ``rpc`` waits
        for the host name to resolve and is sent (or failed) then."""
        key: Target = spec.key
        conn = self.conns.get(key)
        if conn is not None and not conn.closed:
            if conn.state is not ConnState.GOAWAY:
                return conn
            self.retired.add(conn)  # a new connection takes its place; it finishes its calls
            del self.conns[key]
        now = self.ctx.clock.now()
        failed = self.failed.get(key)
        if failed is not None:
            until, code, msg = failed
            if now < until:
                return code, msg
            del self.failed[key]
        waiting = self.resolving.get(key)
        if waiting is not None:
            waiting[1].append(rpc)
            return None
        known = tcp_resolve.lookup(spec.host, spec.port, lambda: self._on_resolved(key))
        if known is None:
            self.resolving[key] = (now + self.tcp.connect_timeout, [rpc])
            return None
        addr, error = known
        if addr is None:
            msg = (
                f"cannot resolve host {spec.host!r} of {spec.addr}: {error}; "
                f"check the name or connect by IP address"
            )
            self.failed[key] = (now + FAILED_RETRY, StatusCode.UNAVAILABLE, msg)
            return StatusCode.UNAVAILABLE, msg
        try:
            sock, connecting = connect_nonblocking(
                addr,
                spec.port,
                nodelay=self.tcp.nodelay,
                sndbuf=self.tcp.sndbuf,
                rcvbuf=self.tcp.rcvbuf,
            )
        except OSError as e:
            msg = (
                f"cannot reach mrpcd at {spec.addr}: {e.strerror or e}; "
                f"is the remote daemon running and listening there?"
            )
            self.failed[key] = (now + FAILED_RETRY, StatusCode.UNAVAILABLE, msg)
            return StatusCode.UNAVAILABLE, msg
        conn = Conn(
            sock,
            self,
            self.poller,
            peer=spec.addr,
            outbound=True,
            max_body=self.max_message_size,
            connecting=connecting,
            clock=self.ctx.clock,
            max_sendq=sys.maxsize,
        )  # never stop reading replies: the server may be waiting on us
        conn.info.update(
            conn_id=key,
            schema_hash=binding.schema_hash,
            connect_deadline=now + self.tcp.connect_timeout,
        )
        conn.queue(
            [
                encode_json_frame(
                    HELLO,
                    {
                        "version": PROTOCOL_VERSION,
                        "schema_hash": binding.schema_hash,
                        "services": list(binding.services)[:MAX_HELLO_SERVICES],
                        "app": self.app.name,
                        "pid": self.app.pid,
                        "daemon": self.daemon_name,
                        "max_message_size": self.max_message_size,
                        "features": wf.advertise(conn, self.WIRE_FEATURES),
                    },
                )
            ],
            batchable=False,
        )
        self.conns[key] = conn
        if connecting:
            heapq.heappush(self.deadlines, (conn.info["connect_deadline"], -conn.fd))
        return conn

    def _on_resolved(self, key: Target) -> None:
        """From a resolver thread: hand the target to the runtime thread."""
        self._resolved.append(key)
        self.ctx.wake()

    def _sweep(self, now: float) -> int:
        """Time out stalled or idle connections and calls that wait on name resolution too long."""
        n = 0
        for conn in list(self.retired):
            if not conn.calls:
                conn.close("retired (GOAWAY or a transport switch) and no call is left on it")
        for conn in [*self.conns.values(), *self.retired]:
            reason = overdue(conn, now, self.limits)
            if reason is not None:
                conn.close(reason)
        for key, (give_up, calls) in list(self.resolving.items()):
            if now >= give_up:
                del self.resolving[key]
                msg = (
                    f"cannot reach mrpcd at {format_target(key)}: resolving host {key[0]!r} "
                    f"took longer than {self.tcp.connect_timeout:g}s (tcp.connect_timeout)"
                )
                for rpc in calls:
                    self._fail(rpc, StatusCode.UNAVAILABLE, msg)
                n += len(calls)
                continue
            late = [r for r in calls if r.deadline is not None and r.deadline <= now]
            for rpc in late:
                calls.remove(rpc)
                self.counters["deadline_expired"] += 1
                self._fail(
                    rpc,
                    StatusCode.DEADLINE_EXCEEDED,
                    f"deadline exceeded while resolving host {key[0]!r}",
                )
            n += len(late)
        return n

    def cancel(self, rpc: Rpc) -> None:
        """The app cancelled ``rpc``: complete it now with CANCELLED and tell the peer
        daemon (a late reply is then discarded). A call not sent yet fails when it
        gets here (``rpc._cancelled``)."""
        entry = self.pending.get(rpc._wire_id) if rpc._wire_id else None
        if entry is None or entry[0] is not rpc:
            return
        conn = entry[1]
        del self.pending[rpc._wire_id]
        conn.calls.discard(rpc._wire_id)
        self._unpin(rpc._wire_id)  # the app may reuse the request's memory once it sees CANCELLED
        if isinstance(conn, LocalOrigin):
            conn.cancel(rpc._wire_id)
        else:
            conn.queue([encode_header(CANCEL, call_id=rpc._wire_id)])
            self.dirty.add(conn)
        self.counters["cancelled"] = self.counters.get("cancelled", 0) + 1
        self._fail(rpc, StatusCode.CANCELLED, "the call was cancelled by the caller")

    def _send_call(self, rpc: Rpc) -> None:
        st: TxCall = rpc._state
        if rpc._cancelled:
            return self._fail(rpc, StatusCode.CANCELLED, "the call was cancelled by the caller")
        conn = self._conn_for(st.conn, st.binding, rpc)
        if conn is None:
            return  # waits for name resolution
        if isinstance(conn, tuple):
            return self._fail(rpc, *conn)
        assert rpc.method is not None
        if st.wire is None:  # the frontend marshals every call; this is a bug, not an input
            return self._fail(
                rpc, StatusCode.INTERNAL, "mrpcd: call reached the transport unmarshalled"
            )
        head, segs = st.wire
        size = len(head) + sum(len(s) for s in segs)
        rpc.size = size
        peer_max = conn.info.get("peer_max")
        if peer_max is not None and size > peer_max:
            return self._fail(
                rpc,
                StatusCode.RESOURCE_EXHAUSTED,
                f"request of {size} bytes for {rpc.method.path} exceeds the max_message_size "
                f"of mrpcd at {conn.peer} ({peer_max} bytes; this daemon's is "
                f"{self.max_message_size}); send less or ask its operator to raise it",
            )
        wire_id = rpc._wire_id = next(self._wire_ids)
        timeout_us = 0
        if rpc.deadline is not None:
            timeout_us = clamp_timeout_us(max(1, int((rpc.deadline - self.ctx.clock.now()) * 1e6)))
            heapq.heappush(self.deadlines, (rpc.deadline, wire_id))
        frames = [
            encode_header(
                CALL, call_id=wire_id, method=rpc.method.id, body_len=size, aux=timeout_us
            ),
            head,
            *segs,
        ]
        if rpc.metadata:  # a METADATA frame first; a call without metadata is unchanged
            block = md.encode(rpc.metadata)
            frames[:0] = [encode_header(METADATA, call_id=wire_id, body_len=len(block)), block]
        sent = None
        if segs and not conn.closed:  # zero-copy: where the frames sit until the kernel took them
            start = conn.position()
            self.unsent[wire_id] = (conn, start, start + sum(len(f) for f in frames))
            sent = self._sent_cb(wire_id)
        conn.queue(frames, sent, frames=2 if rpc.metadata else 1)
        self.pending[wire_id] = (rpc, conn)
        conn.calls.add(wire_id)
        self.dirty.add(conn)
        self.counters["calls_sent"] += 1

    def _send_reply(self, rpc: Rpc) -> None:
        """A reply for an inbound call (the server app's answer, or an error for a
        call refused on the receive side): its connection belongs to the ingress,
        which writes it on its own runtime. Any other REPLY is a send-side error
        on its way back to this app."""
        st = rpc._state
        call = _inbound_call(st)
        if call is None:
            self.rx_out.append(rpc)
            return
        call.origin.owner.post(rpc)
        if isinstance(st, TxReply):
            self.counters["replies_sent"] += 1

    def abandon(self, rpcs: list[Rpc], details: str) -> None:
        """The app is gone: every inbound call among ``rpcs`` gets UNAVAILABLE."""
        for rpc in rpcs:
            call = _inbound_call(rpc._state)
            if call is None or call.origin.closed:
                continue
            call.origin.owner.post(
                Rpc(
                    RpcKind.REPLY,
                    rpc.app,
                    rpc.app_pid,
                    rpc.call_id,
                    rpc.method,
                    status=StatusCode.UNAVAILABLE,
                    details=details,
                    _state=call,
                )
            )

    def _sent_cb(self, wire_id: int) -> Callable[[], None]:
        """Forget where a call's frames sit once the kernel took them (or they were dropped)."""
        unsent = self.unsent

        def sent() -> None:
            unsent.pop(wire_id, None)

        return sent

    def _unpin(self, wire_id: int) -> None:
        """A call completes before the kernel took all of its request: copy the
        unsent part out of the app's send heap, which the app reuses once it
        hears of the completion (the peer must never get bytes it rewrote)."""
        entry = self.unsent.pop(wire_id, None)
        if entry is not None and not entry[0].closed:
            self.counters["unsent_bytes_copied"] += entry[0].sendq.privatize(entry[1], entry[2])

    def _expire(self) -> int:
        now = self.ctx.clock.now()
        n = 0
        while self.deadlines and self.deadlines[0][0] <= now:
            _, key = heapq.heappop(self.deadlines)
            if key < 0:  # a connect deadline, keyed by -fd
                for conn in list(self.conns.values()):
                    if conn.fd == -key and conn.state is ConnState.CONNECTING:
                        conn.close(
                            f"connect to {conn.peer} timed out after {self.tcp.connect_timeout}s"
                        )
                continue
            entry = self.pending.pop(key, None)
            if entry is None:
                continue
            rpc, conn = entry
            conn.calls.discard(key)
            self._unpin(key)
            n += 1
            self.counters["deadline_expired"] += 1
            self._fail(
                rpc,
                StatusCode.DEADLINE_EXCEEDED,
                f"deadline exceeded waiting for {rpc.method.path if rpc.method else 'reply'} "
                f"from {conn.peer}",
            )
        return n

    def prepare_sleep(self) -> bool:
        # delivered or posted from this runtime's own thread: no wake-up came
        return bool(self.rx_in) or bool(self.replies)

    def post(self, rpc: Rpc) -> None:
        """From any runtime: a server app's answer to a local call of this app."""
        self.replies.append(rpc)
        if self.local is not None and self.local.closed:  # this app is gone
            local_calls.drain_dead(self.replies)
        else:
            self.ctx.wake()

    def next_timer(self) -> float | None:
        t = self.deadlines[0][0] if self.deadlines else None
        if self.conns or self.resolving or self.retired:
            t = self._next_sweep if t is None else min(t, self._next_sweep)
        return t

    # ------------------------------------------------------------------ rx (outbound conns)

    def frame_sink(self, conn: Conn, header: FrameHeader) -> memoryview | Body | None:
        t = header.type
        if t != REPLY:
            if t == CALL or t == HELLO:
                raise WireError(f"peer sent a {FRAME_NAMES[t]} frame on a client connection")
            return DISCARD if t in (PING, PONG) else None  # small control bodies are kept
        if header.body_len == 0:
            return None
        entry = self.pending.get(header.call_id)
        if entry is None or entry[1] is not conn:
            return DISCARD  # a late (or made-up) reply: skipped, never stored
        if header.body_len > self.max_message_size:  # skipped; that call alone fails
            conn.cur = OversizeReply(header.body_len)
            return DISCARD
        try:
            off = self.app.recv_alloc(header.body_len)
        except HeapExhausted as e:
            conn.cur = e
            return DISCARD
        conn.cur = Landed(off, header.body_len)
        return self.app.recv_view[off : off + header.body_len]

    def handle_frame(self, conn: Conn, header: FrameHeader, body: memoryview) -> None:
        t = header.type
        if t == REPLY or t == ERROR:
            entry = self.pending.get(header.call_id)
            if entry is None or entry[1] is not conn:
                self.counters["late_replies"] += 1
                return
            del self.pending[header.call_id]
            rpc, _ = entry
            conn.calls.discard(header.call_id)
            self._unpin(header.call_id)  # a peer may answer before reading the whole call
            trailing: md.Metadata = ()
            block = conn.info.pop("metadata", None)
            if block is not None and block[0] == header.call_id:
                try:
                    trailing = md.decode(block[1], self.max_metadata_size)
                except md.MetadataError as e:
                    if t == REPLY:
                        free_landed(self.app, conn.cur if isinstance(conn.cur, Landed) else None)
                    return self._fail(
                        rpc, StatusCode.INTERNAL, f"trailing metadata from {conn.peer}: {e}"
                    )
            if t == ERROR:
                code = StatusCode(header.status) if header.status else StatusCode.UNKNOWN
                self.counters["errors"] += 1
                self.counters["replies_sent"] += 1
                err = rpc.error_reply(code, bytes(body).decode("utf-8", "replace"))
                err.metadata = trailing
                self.rx_out.append(err)
                return
            landed = conn.cur
            if isinstance(landed, OversizeReply):
                return self._fail(
                    rpc,
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"reply of {landed.size} bytes from {conn.peer} exceeds this daemon's "
                    f"max_message_size ({self.max_message_size} bytes); ask for less or "
                    f"raise max_message_size",
                )
            if isinstance(landed, HeapExhausted):
                return self._fail(
                    rpc,
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"no room for a {header.body_len}-byte reply: {landed}",
                )
            assert rpc.method is not None
            try:
                rpc_module = rpc._state.binding.module
                rpc_module.VALIDATE[rpc.method.response](body)
            except WireError as e:
                free_landed(self.app, landed)
                return self._fail(
                    rpc, StatusCode.INTERNAL, f"malformed reply from {conn.peer}: {e}"
                )
            self.counters["replies_received"] += 1
            self.rx_out.append(
                Rpc(
                    RpcKind.REPLY,
                    rpc.app,
                    rpc.app_pid,
                    rpc.call_id,
                    rpc.method,
                    size=header.body_len,
                    created=rpc.created,
                    meta=rpc.meta,
                    metadata=trailing,
                    _state=landed,
                )
            )
        elif t == METADATA:  # for the REPLY / ERROR with this id, which comes next
            conn.info["metadata"] = (header.call_id, bytes(body))
        elif t == HELLO_ACK:
            ack = decode_json_body(body)
            if not ack.get("ok"):
                code = _status(ack.get("code"), StatusCode.UNAVAILABLE)
                msg = str(ack.get("error", "the remote daemon refused the connection"))[:2000]
                msg += f" (this app's schema hash is {conn.info.get('schema_hash')})"
                conn.info["refused"] = (code, msg)
                self.failed[conn.info["conn_id"]] = (self.ctx.clock.now() + FAILED_RETRY, code, msg)
                conn.close(f"handshake refused: {msg}")
            else:
                conn.move("hello_ack")
                conn.info["peer_daemon"] = ack.get("daemon")
                peer_max = ack.get("max_message_size")  # absent from older daemons
                if isinstance(peer_max, int) and not isinstance(peer_max, bool) and peer_max > 0:
                    conn.info["peer_max"] = peer_max
                wf.negotiate(conn, self.WIRE_FEATURES, wf.parse(ack.get("features"), "HELLO_ACK"))
                if wf.sync(conn, self.WIRE_FEATURES):  # upgraded since our HELLO went out
                    self.dirty.add(conn)
        elif t == FEATURES:
            if wf.on_features(conn, body, self.WIRE_FEATURES):
                self.dirty.add(conn)
        elif t == PING:
            if answer_ping(conn, header):
                self.dirty.add(conn)
        elif t == GOAWAY:
            conn.move("goaway")
        elif t == PONG:
            pass
        else:
            raise WireError(f"unexpected {t} frame on a client connection")

    def conn_closed(self, conn: Conn, reason: str) -> None:
        code, msg = conn.info.get("refused") or (
            StatusCode.UNAVAILABLE,
            f"connection to mrpcd at {conn.peer} lost: {reason}",
        )
        landed = conn.cur
        if isinstance(landed, Landed):
            free_landed(self.app, landed)
        for wire_id in list(conn.calls):
            entry = self.pending.pop(wire_id, None)
            if entry is not None:
                self._fail(entry[0], code, msg)
        conn.calls.clear()
        cid = conn.info.get("conn_id")
        if cid is not None and self.conns.get(cid) is conn:
            del self.conns[cid]
        self.retired.discard(conn)
        self.dirty.discard(conn)

    # ------------------------------------------------------------------ lifecycle

    def statistics(self) -> dict[str, int | float]:
        return dict(
            self.counters,
            pending=len(self.pending),
            connections=len(self.conns),
            **wf.describe(self.conns.values()),
        )

    def decompose(self) -> dict[str, Any]:
        state = {
            "conns": self.conns,
            "pending": self.pending,
            "deadlines": self.deadlines,
            "unsent": self.unsent,  # the same dict: queued callbacks pop from it
            "failed": self.failed,
            "resolving": self.resolving,
            "retired": self.retired,
            "next_wire_id": next(self._wire_ids),
            "counters": dict(self.counters),
            "local": self.local,
            "replies": self.replies,  # the same deque: a late post() to this instance lands in it
        }
        self.conns, self.pending, self.deadlines, self.failed, self.resolving = {}, {}, [], {}, {}
        self.unsent = {}
        self.retired = set()
        self._handed_over = True  # local origin and replies are the successor's now
        return state

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        self.conns.update(state.get("conns", {}))
        self.retired.update(state.get("retired", ()))
        self.pending.update(state.get("pending", {}))
        self.unsent = state.get("unsent", self.unsent)
        self.deadlines.extend(state.get("deadlines", []))
        heapq.heapify(self.deadlines)
        self.failed.update(state.get("failed", {}))
        for key, entry in state.get("resolving", {}).items():
            self.resolving[key] = entry  # ask again: the old instance's callback would be lost
            if (
                tcp_resolve.lookup(key[0], key[1], functools.partial(self._on_resolved, key))
                is not None
            ):
                self._resolved.append(key)
        self._wire_ids = itertools.count(state.get("next_wire_id", 1))
        self.counters.update(state.get("counters", {}))
        replies = state.get("replies")
        if replies is not None and replies is not self.replies:
            replies.extend(self.replies)
            self.replies = replies
        self._handed_over = False
        self.local = state.get("local")
        if self.local is not None:
            self.local.owner = self  # where the server apps post their answers now
        for conn in [*self.conns.values(), *self.retired]:
            conn.owner = self
            if wf.sync(conn, self.WIRE_FEATURES):  # new code: tell the peer what it understands
                self.dirty.add(conn)

    # ------------------------------------------------------------------ hot restart

    def settled(self, waiting: bool = False) -> bool:
        """Quiescing for a hot restart: nothing half sent or read, no answer of a
        local call to take; no call pending either, unless ``waiting`` (then calls
        fully sent may wait for their reply: ``export_state`` carries them)."""
        if self.unsent or self.resolving or self._resolved or self.replies:
            return False
        if self.pending and not waiting:
            return False
        conns = [*self.conns.values(), *self.retired]
        return all(c.closed or conn_settled(c, waiting=waiting) for c in conns)

    def export_state(self) -> tuple[dict[str, Any], list[socket.socket]]:
        """Plain data and sockets for the next daemon (only when ``settled``): the
        open connections (retired ones only while calls wait on them) and the calls
        waiting for a reply (:mod:`engines.handover_calls`). Changes nothing."""
        docs: list[Any] = []
        retired: list[Any] = []
        socks: list[socket.socket] = []
        index: dict[int, int] = {}  # id(conn) -> its place in docs + retired
        for key, conn in self.conns.items():
            if not conn.closed:
                doc, sock = export_conn(conn)
                index[id(conn)] = len(socks)
                docs.append((tuple(key), doc))
                socks.append(sock)
        for conn in self.retired:
            if not conn.closed and conn.calls:
                doc, sock = export_conn(conn)
                index[id(conn)] = len(socks)
                retired.append((tuple(conn.info.get("conn_id", ("", 0, 0))), doc))
                socks.append(sock)
        calls = []
        for wire_id, (rpc, conn) in self.pending.items():
            via: tuple[Any, ...] = (
                ("local",) if isinstance(conn, LocalOrigin) else ("conn", index[id(conn)])
            )
            calls.append(handover_calls.outbound_doc(wire_id, rpc, via))
        return {
            "conns": docs,
            "retired": retired,
            "calls": calls,
            "next_wire_id": next(self._wire_ids),
            "counters": dict(self.counters),
        }, socks

    def import_state(self, state: Mapping[str, Any], socks: list[socket.socket]) -> None:
        """Adopt ``export_state``'s connections (their sockets in the same order)
        and the calls waiting on them, with their deadlines."""
        docs = [*state["conns"], *state.get("retired", ())]
        conns: list[Conn] = []
        for i, ((key, doc), sock) in enumerate(zip(docs, socks, strict=True)):
            conn = import_conn(
                doc,
                sock,
                self,
                self.poller,
                max_body=self.max_message_size,
                clock=self.ctx.clock,
                max_sendq=sys.maxsize,
            )
            conn.info["conn_id"] = tuple(key)
            if i < len(state["conns"]):
                self.conns[tuple(key)] = conn
            else:
                self.retired.add(conn)
            conns.append(conn)
            if wf.sync(conn, self.WIRE_FEATURES):  # the new code may understand more (or less)
                self.dirty.add(conn)
        for doc in state.get("calls", ()):
            rpc = handover_calls.outbound_rpc(doc, self.app)
            wire_id = rpc._wire_id
            if doc["via"][0] == "local":
                local = self.local_origin()
                local.calls.add(wire_id)
                self.pending[wire_id] = (rpc, local)  # type: ignore[assignment]
            else:
                conn = conns[doc["via"][1]]
                conn.calls.add(wire_id)
                self.pending[wire_id] = (rpc, conn)
            if rpc.deadline is not None:
                heapq.heappush(self.deadlines, (rpc.deadline, wire_id))
        self._wire_ids = itertools.count(int(state.get("next_wire_id", 1)))
        self.counters.update(state.get("counters", {}))

    def export_served(self, ingress_socks: dict[int, int]) -> list[dict[str, Any]]:
        """Hot restart: the calls this (server) app holds unanswered, as plain data."""
        return handover_calls.export_served(self.app, ingress_socks)

    def import_served(self, doc: dict[str, Any], origin: Any) -> None:
        """Hot restart: this server app holds ``doc``'s call again; its answer goes to
        ``origin`` (an ingress connection, a client's LocalOrigin; None: dropped)."""
        handover_calls.import_served(self.app, doc, origin)

    def local_origin(self) -> LocalOrigin:
        """Where server apps of this daemon answer this app's local calls."""
        if self.local is None:
            self.local = LocalOrigin(self)
        return self.local

    def close(self) -> None:
        for conn in [*self.conns.values(), *self.retired]:
            conn.close("application left")
        if self._handed_over:
            return  # an upgrade's old instance: the shared local origin and replies live on
        if self.local is not None:
            self.local.closed = True
        local_calls.drain_dead(self.replies)


ENGINE = TcpTransport
INGRESS = TcpIngress
