"""``tcp-ingress``: the daemon-wide half of the TCP transport.

It owns the listening socket and the inbound connections from peer daemons:
checks each peer's handshake (a bounded HELLO: protocol version, schema hash,
at most MAX_HELLO_SERVICES services), routes inbound calls by method to the
server app in O(1) and lands them in that app's receive heap. Peers are
untrusted: a body it will not keep is skipped as it arrives; calls, bytes
reserved and queued output are bounded per connection, connections per
address and in all; stalled, silent and idle connections are timed out (see
:mod:`engines.tcp_limits`). A refused HELLO tells the peer only that its
schema does not match; the details are logged here.

It negotiates wire features with each peer (:mod:`engines.tcp_features`) and
can be upgraded live (``mrpcctl engine upgrade tcp-ingress --module
engines.tcp_ingress``): ``decompose`` hands over the inbound connections and
the outbox (the same deque: a reply posted by another runtime during the swap
lands in the successor's), the listener is re-registered by the successor, and
its ``load_state`` announces new features on every live connection.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from engines import tcp_features as wf
from engines.tcp_conn import Conn, ConnState, configure, conn_settled, export_conn, import_conn
from engines.tcp_limits import (
    PONG_QUEUE_MAX,
    PeerLimits,
    RateLimitedLog,
    admit,
    count_ping,
    overdue,
    reap_gone_apps,
    settle,
)
from libmrpc.status import RpcError, StatusCode
from libmrpc.wire import metadata as md
from libmrpc.wire.errors import WireError
from libmrpc.wire.frames import (
    CALL,
    CANCEL,
    DISCARD,
    FEATURES,
    FRAME_NAMES,
    GOAWAY,
    HELLO,
    HELLO_ACK,
    MAX_HELLO_SERVICES,
    MAX_SERVICE_NAME,
    METADATA,
    PING,
    PONG,
    REPLY,
    Body,
    FrameHeader,
    clamp_timeout_us,
    decode_json_body,
    encode_error,
    encode_header,
    encode_json_frame,
)
from libmrpc.wire.heap import HeapExhausted
from mrpcd.engine import (
    AppPort,
    EngineContext,
    IngressEngine,
    Landed,
    MethodRef,
    Rpc,
    RpcKind,
    RxCall,
    TxReply,
)

log = logging.getLogger(__name__)


def free_landed(app: AppPort, landed: Landed | None) -> None:
    if landed is not None and landed.heap_off is not None:
        try:
            app.recv_free(landed.heap_off)
        except ValueError:
            pass
        landed.heap_off = None


def send_error(conn: Conn, wire_id: int, code: StatusCode, details: str) -> None:
    conn.queue(encode_error(wire_id, code, details))


def answer_ping(conn: Conn, header: FrameHeader) -> bool:
    """Queue a PONG unless the peer leaves output unread; a PING flood closes the connection."""
    count_ping(conn)
    if len(conn.sendq) >= PONG_QUEUE_MAX:
        return False
    conn.queue([encode_header(PONG, call_id=header.call_id)])
    return True


class TcpIngress(IngressEngine):
    """Daemon-wide: accepts peer daemons' connections, routes their calls, answers them.

    It alone touches its connections, on its runtime. Server apps' datapaths,
    on any runtime, hand it their replies with :meth:`post`; it hands inbound
    calls to a server app with ``AppPort.deliver``.
    """

    NAME = "tcp-ingress"
    VERSION = 2  # 2: wire features (FEATURES, BATCH), upgradable live
    WIRE_FEATURES: frozenset[str] = wf.WIRE_FEATURES

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        svc = ctx.services
        if svc.router is None or ctx.poller is None or ctx.listener is None:
            raise ValueError("tcp-ingress needs the router, a poller and the listening socket")
        self.router = svc.router
        self.poller = ctx.poller
        self.tcp = svc.tcp
        self.listener: socket.socket = ctx.listener
        self.max_message_size = svc.max_message_size
        self.max_metadata_size = svc.max_metadata_size
        self.daemon_name = svc.daemon_name
        self.limits = PeerLimits.from_config(self.tcp, self.max_message_size)
        self.conns: set[Conn] = set()
        self.dirty: set[Conn] = set()
        self.outbox: deque[Rpc] = deque()  # replies posted by server apps' datapaths
        self._thread = 0  # ident of the runtime thread that drives this engine
        self.per_ip: dict[str, int] = {}
        self._resume_accept: float | None = None
        self._next_sweep = 0.0
        self._log_refused = RateLimitedLog()
        self.counters = {
            "accepted": 0,
            "calls_routed": 0,
            "calls_refused": 0,
            "handshakes_refused": 0,
            "connections_refused": 0,
            "connections_timed_out": 0,
        }
        self.listener.setblocking(False)
        self.poller.register(self.listener.fileno(), 1, self._on_accept)
        self._listening = True

    def _on_accept(self, _events: int) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: back off, keep serving
                log.error("accept failed: %s; pausing accepts for 100 ms", e)
                self.poller.unregister(self.listener.fileno())
                self._listening = False
                self._resume_accept = self.ctx.clock.now() + 0.1
                return
            ip = str(addr[0])
            if (
                len(self.conns) >= self.limits.max_inbound
                or self.per_ip.get(ip, 0) >= self.limits.max_per_ip
            ):
                sock.close()
                self.counters["connections_refused"] += 1
                self._log_refused(
                    self.ctx.clock.now(),
                    "refused a peer connection from %s: %d open "
                    "(%d from that address); limits tcp.max_inbound_connections=%d, "
                    "tcp.max_inbound_per_ip=%d",
                    ip,
                    len(self.conns),
                    self.per_ip.get(ip, 0),
                    self.limits.max_inbound,
                    self.limits.max_per_ip,
                )
                continue
            try:
                configure(
                    sock, nodelay=self.tcp.nodelay, sndbuf=self.tcp.sndbuf, rcvbuf=self.tcp.rcvbuf
                )
            except OSError as e:  # reset before we got to it
                log.info("peer connection from %s failed at once: %s", ip, e)
                sock.close()
                continue
            peer = f"[{ip}]:{addr[1]}" if ":" in ip else f"{ip}:{addr[1]}"
            conn = Conn(
                sock,
                self,
                self.poller,
                peer=peer,
                outbound=False,
                max_body=self.max_message_size,
                clock=self.ctx.clock,
                max_sendq=self.limits.max_send_queue,
            )
            conn.info["ip"] = ip
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            self.conns.add(conn)
            self.counters["accepted"] += 1

    def post(self, rpc: Rpc) -> None:
        """From any runtime: answer an inbound call (a REPLY whose state is the
        server app's :class:`TxReply`, or an error REPLY whose state is the call's
        :class:`RxCall`); written by this engine's runtime."""
        if threading.get_ident() == self._thread:  # on our runtime: write it now
            self._answer(rpc)
            return
        self.outbox.append(rpc)
        self.ctx.wake()

    def do_work(self) -> int:
        if not self._thread:
            self._thread = threading.get_ident()  # the runtime driving us (post checks it)
        n = 0
        outbox = self.outbox
        while outbox:
            self._answer(outbox.popleft())
            n += 1
        if self._resume_accept is not None or self.conns:
            now = self.ctx.clock.now()
            if self._resume_accept is not None and now >= self._resume_accept:
                self._resume_accept = None
                self.poller.register(self.listener.fileno(), 1, self._on_accept)
                self._listening = True
            if self.conns and now >= self._next_sweep:
                self._next_sweep = now + self.limits.tick
                self._sweep(now)
        if not self.dirty:
            return n
        dirty, self.dirty = self.dirty, set()
        for conn in dirty:  # a flush may close a connection (and touch self.dirty)
            conn.flush()
        return n

    def _sweep(self, now: float) -> None:
        for conn in list(self.conns):
            reap_gone_apps(conn)
            reason = overdue(conn, now, self.limits)
            if reason is not None:
                self.counters["connections_timed_out"] += 1
                conn.close(reason)

    def prepare_sleep(self) -> bool:
        return bool(self.outbox)  # posted from this runtime's own thread: no wake-up came

    def next_timer(self) -> float | None:
        t = self._resume_accept
        if self.conns:
            t = self._next_sweep if t is None else min(t, self._next_sweep)
        return t

    def frame_sink(self, conn: Conn, header: FrameHeader) -> memoryview | Body | None:
        t = header.type
        if t == HELLO:
            if conn.state is not ConnState.AWAIT_HELLO:
                raise WireError("a second HELLO on one connection")
            return None  # at most MAX_HELLO_BODY bytes, kept
        if t == METADATA or t == CANCEL or t == FEATURES:
            if conn.state is not ConnState.READY:
                raise WireError(f"{FRAME_NAMES[t]} before HELLO")
            return None  # at most MAX_CONTROL_BODY bytes, kept until its CALL
        if t != CALL:
            if t in (PING, PONG, GOAWAY):
                return DISCARD if header.body_len else None
            raise WireError(f"unexpected {FRAME_NAMES[t]} frame on a server connection")
        if conn.state is not ConnState.READY:
            raise WireError("CALL before HELLO")
        if header.body_len == 0:
            return None
        if header.body_len > self.max_message_size:  # skipped; that call alone fails
            conn.cur = RpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"request of {header.body_len} bytes exceeds the max_message_size of the "
                f"server's mrpcd ({self.max_message_size} bytes)",
            )
            return DISCARD
        hello = conn.info["hello"]
        try:
            app, binding, method = self.router.route(
                hello["schema_hash"], header.method, hello["services"]
            )
        except RpcError as e:
            conn.cur = e
            return DISCARD
        refusal = admit(conn, app, header.call_id, header.body_len, self.limits)
        if refusal is not None:
            conn.cur = RpcError(*refusal)
            return DISCARD
        if app.reads_content:
            conn.cur = (app, binding, method, Landed(None, header.body_len))
            return None  # land in private memory (grown as it arrives); a receive-side policy looks first
        try:
            off = app.recv_alloc(header.body_len)
        except HeapExhausted as e:
            settle(conn, header.call_id)
            conn.cur = RpcError(StatusCode.RESOURCE_EXHAUSTED, f"server app {app.name!r}: {e}")
            return DISCARD
        conn.cur = (app, binding, method, Landed(off, header.body_len))
        return app.recv_view[off : off + header.body_len]

    def handle_frame(self, conn: Conn, header: FrameHeader, body: memoryview) -> None:
        t = header.type
        if t == CALL:
            self._call(conn, header, body)
        elif t == CANCEL:
            self._cancel(conn, header.call_id)
        elif t == METADATA:  # for the CALL with this id, which comes next
            conn.info["metadata"] = (header.call_id, bytes(body))
        elif t == HELLO:
            self._hello(conn, body)
        elif t == FEATURES:
            if wf.on_features(conn, body, self.WIRE_FEATURES):
                self.dirty.add(conn)
        elif t == PING:
            if answer_ping(conn, header):
                self.dirty.add(conn)
        elif t in (PONG, GOAWAY):
            pass
        else:
            raise WireError(f"unexpected frame type {t} on a server connection")

    def _hello(self, conn: Conn, body: memoryview) -> None:
        hello = decode_json_body(body)
        schema_hash, services = hello.get("schema_hash"), hello.get("services")
        if (
            not isinstance(schema_hash, str)
            or not isinstance(services, list)
            or not all(isinstance(s, str) for s in services)
        ):
            raise WireError("HELLO lacks schema_hash or services")
        if len(schema_hash) > 128:
            raise WireError(f"HELLO schema_hash of {len(schema_hash)} characters (at most 128)")
        if len(services) > MAX_HELLO_SERVICES:
            raise WireError(f"HELLO lists {len(services)} services (at most {MAX_HELLO_SERVICES})")
        if any(len(svc) > MAX_SERVICE_NAME for svc in services):
            raise WireError(f"HELLO lists a service name longer than {MAX_SERVICE_NAME} characters")
        client = (
            f"{str(hello.get('app', '?'))[:64]!r} (pid {str(hello.get('pid', '?'))[:12]}) "
            f"at {str(hello.get('daemon', '?'))[:128]!r} from {conn.peer}"
        )
        announced = frozenset(services)
        try:
            self.router.check_hello(schema_hash, announced, client)
        except RpcError as e:
            self.counters["handshakes_refused"] += 1
            conn.queue(
                [
                    encode_json_frame(
                        HELLO_ACK, {"ok": False, "code": int(e.code()), "error": e.details()}
                    )
                ]
            )
            conn.flush()
            conn.close(f"handshake refused: {e.details()}")
            return
        peer_features = wf.parse(hello.get("features"), "HELLO")
        conn.move("hello")
        wf.negotiate(conn, self.WIRE_FEATURES, peer_features)
        conn.info["hello"] = {"schema_hash": schema_hash, "services": announced, "client": client}
        peer_max = hello.get("max_message_size")  # absent from older daemons
        if isinstance(peer_max, int) and not isinstance(peer_max, bool) and peer_max > 0:
            conn.info["hello"]["max_message_size"] = peer_max
        conn.queue(
            [
                encode_json_frame(
                    HELLO_ACK,
                    {
                        "ok": True,
                        "daemon": self.daemon_name,
                        "max_message_size": self.max_message_size,
                        "features": wf.advertise(conn, self.WIRE_FEATURES),
                    },
                )
            ],
            batchable=False,
        )
        self.dirty.add(conn)

    def _call(self, conn: Conn, header: FrameHeader, body: memoryview) -> None:
        cur = conn.cur
        if conn.state is not ConnState.READY:
            raise WireError("CALL before HELLO")
        block = conn.info.pop("metadata", None)
        metadata: md.Metadata = ()
        if block is not None and block[0] == header.call_id and not isinstance(cur, RpcError):
            try:
                metadata = md.decode(block[1], self.max_metadata_size)
            except md.MetadataError as e:
                if isinstance(cur, tuple):
                    free_landed(cur[0], cur[3])
                    settle(conn, header.call_id)
                cur = RpcError(e.status, f"metadata from {conn.peer}: {e}")
        if cur is None:  # empty body: not even a root record
            cur = RpcError(StatusCode.INVALID_ARGUMENT, "call carries an empty message image")
        if isinstance(cur, RpcError):
            self.counters["calls_refused"] += 1
            send_error(conn, header.call_id, cur.code(), cur.details())
            self.dirty.add(conn)
            return
        app, binding, method, landed = cur
        if landed.heap_off is None:
            landed.private = body
        try:
            binding.module.VALIDATE[method.request](body)
        except WireError as e:
            free_landed(app, landed)
            settle(conn, header.call_id)
            send_error(
                conn,
                header.call_id,
                StatusCode.INVALID_ARGUMENT,
                f"malformed {method.request} for {method.path}: {e}",
            )
            self.dirty.add(conn)
            return
        if app.closed:
            free_landed(app, landed)
            settle(conn, header.call_id)
            send_error(
                conn, header.call_id, StatusCode.UNAVAILABLE, f"server app {app.name!r} is gone"
            )
            self.dirty.add(conn)
            return
        now = self.ctx.clock.now()
        token = app.next_token()
        timeout_us = clamp_timeout_us(header.aux)  # a peer's u64: at most a week
        rpc = Rpc(
            RpcKind.CALL,
            app.name,
            app.pid,
            token,
            MethodRef.of(method),
            deadline=now + timeout_us / 1e6 if timeout_us else None,
            size=header.body_len,
            created=now,
            metadata=metadata,
            peer=conn.info["hello"]["client"],
            _state=RxCall(conn, header.call_id, binding, landed, app),
        )
        cls = binding.module.MESSAGES[method.request]
        rpc._view = lambda: cls._from_image(
            (
                memoryview(landed.private)
                if landed.private is not None
                else app.recv_view[landed.heap_off : landed.heap_off + landed.length]
            ).toreadonly(),
            0,
            landed,
        )
        self.counters["calls_routed"] += 1
        routed = conn.info.setdefault("routed", {})  # wire id -> Rpc, for a CANCEL
        if len(routed) > 2 * len(conn.rx_calls) + 64:
            conn.info["routed"] = routed = {w: r for w, r in routed.items() if w in conn.rx_calls}
        routed[header.call_id] = rpc
        app.deliver(rpc)

    def _cancel(self, conn: Conn, wire_id: int) -> None:
        """The caller cancelled call ``wire_id``: tell its server app (or refuse the
        call before it gets there). A call already answered is left alone."""
        rpc = conn.info.get("routed", {}).pop(wire_id, None)
        entry = conn.rx_calls.get(wire_id)
        if rpc is None or entry is None:
            return
        app: AppPort = entry[0]
        if app.closed:
            return
        app.deliver(Rpc(RpcKind.CANCEL, app.name, app.pid, rpc.call_id, rpc.method, _state=rpc))
        self.counters["calls_cancelled"] = self.counters.get("calls_cancelled", 0) + 1

    # ------------------------------------------------------------------ answers

    def _answer(self, rpc: Rpc) -> None:
        """Write a server app's reply, or an error for an inbound call, on its connection."""
        st = rpc._state
        call: RxCall = st.call if isinstance(st, TxReply) else st
        origin: Conn = call.origin
        settle(origin, call.wire_id)
        port = call.port
        reclaim = self._reclaim_cb(port, rpc.call_id) if isinstance(st, TxReply) else None
        if not isinstance(st, TxReply) and port is not None:
            free_landed(port, call.landed)  # refused before its server app saw it
        if origin.closed:
            if reclaim is not None:
                reclaim()
            return
        self.dirty.add(origin)
        if rpc.metadata:  # trailing metadata: a METADATA frame before the REPLY / ERROR
            block = md.encode(rpc.metadata)
            origin.queue(
                [encode_header(METADATA, call_id=call.wire_id, body_len=len(block)), block]
            )
        if rpc.status is not StatusCode.OK or not isinstance(st, TxReply) or st.wire is None:
            if rpc.status is StatusCode.OK:  # a reply the frontend did not marshal: a bug
                rpc.status, rpc.details = (
                    StatusCode.INTERNAL,
                    "mrpcd: reply reached tcp unmarshalled",
                )
            send_error(origin, call.wire_id, rpc.status, rpc.details)
            if reclaim is not None:
                reclaim()
            return
        assert rpc.method is not None
        head, segs = st.wire
        size = rpc.size or len(head) + sum(len(s) for s in segs)
        peer_max = origin.info.get("hello", {}).get("max_message_size")
        if peer_max is not None and size > peer_max:
            send_error(
                origin,
                call.wire_id,
                StatusCode.RESOURCE_EXHAUSTED,
                f"reply of {size} bytes to {rpc.method.path} exceeds the max_message_size of the "
                f"client's mrpcd ({peer_max} bytes; the server's is {self.max_message_size}); "
                f"ask for less or ask its operator to raise it",
            )
            if reclaim is not None:
                reclaim()
            return
        origin.queue(
            [
                encode_header(REPLY, call_id=call.wire_id, method=rpc.method.id, body_len=size),
                head,
                *segs,
            ],
            reclaim if segs else None,
        )
        if not segs and reclaim is not None:
            reclaim()  # everything was copied into the header buffer already
        self.counters["replies_sent"] = self.counters.get("replies_sent", 0) + 1

    @staticmethod
    def _reclaim_cb(port: AppPort | None, token: int) -> Any:
        """Tell the server app it may reuse its reply's memory (once the kernel took it)."""

        def done() -> None:
            if port is not None and not port.closed:
                port.deliver(Rpc(RpcKind.RECLAIM, port.name, port.pid, token, None))

        return done

    def conn_closed(self, conn: Conn, reason: str) -> None:
        cur = conn.cur
        if isinstance(cur, tuple):
            free_landed(cur[0], cur[3])
        if conn in self.conns:
            self.conns.discard(conn)
            ip = str(conn.info.get("ip"))
            left = self.per_ip.get(ip, 0) - 1
            if left > 0:
                self.per_ip[ip] = left
            else:
                self.per_ip.pop(ip, None)
        self.dirty.discard(conn)

    def statistics(self) -> dict[str, int | float]:
        return dict(self.counters, connections=len(self.conns), **wf.describe(self.conns))

    def decompose(self) -> dict[str, Any]:
        """Hand over the listener's connections (sockets, buffers, half-read frames)
        and the outbox itself (other runtimes may still append to it)."""
        self.poller.unregister(self.listener.fileno())
        self._listening = False
        state = {
            "conns": set(self.conns),
            "dirty": set(self.dirty),
            "counters": dict(self.counters),
            "per_ip": dict(self.per_ip),
            "outbox": self.outbox,
        }
        self.conns, self.dirty, self.per_ip = set(), set(), {}
        return state  # self.outbox stays the shared deque: a late post lands in it

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        outbox = state.get("outbox")
        if outbox is not None and outbox is not self.outbox:
            outbox.extend(self.outbox)  # nothing, unless posted before we took over
            self.outbox = outbox
        self.conns.update(state.get("conns", ()))
        self.dirty.update(state.get("dirty", ()))
        self.per_ip.update(state.get("per_ip", {}))
        self.counters.update(state.get("counters", {}))
        if not self._listening:  # a rollback: the listener goes back to this instance
            self._resume_accept = None
            self.poller.unregister(self.listener.fileno())  # a half-built successor's
            self.poller.register(self.listener.fileno(), 1, self._on_accept)
            self._listening = True
        for conn in self.conns:
            conn.owner = self
            if wf.sync(conn, self.WIRE_FEATURES):  # new code: tell the peer what it understands
                self.dirty.add(conn)

    # ------------------------------------------------------------------ hot restart

    def quiesce(self, on: bool) -> None:
        """A hot restart: stop (or resume) reading every inbound connection at its
        next frame boundary; what a peer sends meanwhile waits in the kernel."""
        for conn in self.conns:
            if conn.hold != on and not conn.closed:
                conn.set_hold(on)

    def settled(self, waiting: bool = False) -> bool:
        """Quiescing: every connection held at a frame boundary, nothing to answer or
        send; no inbound call unanswered either, unless ``waiting`` (then a call its
        server app holds, ``AppPort.server_calls``, may wait: the hand-over carries it)."""
        self.quiesce(True)  # connections accepted since
        if self.outbox:
            return False
        for conn in self.conns:
            if conn.closed:
                continue
            if not conn.held or not conn_settled(conn, waiting=waiting):
                return False
            if conn.rx_calls and not all(self.waiting_call(conn, w) for w in conn.rx_calls):
                return False
        return True

    @staticmethod
    def waiting_call(conn: Conn, wire_id: int) -> Rpc | None:
        """The call ``wire_id`` of ``conn`` if its server app holds it unanswered
        (delivered, not answered), else None (it is on its way, or its app left)."""
        entry = conn.rx_calls.get(wire_id)
        rpc = conn.info.get("routed", {}).get(wire_id)
        if entry is None or rpc is None:
            return None
        app: AppPort = entry[0]
        return rpc if not app.closed and app.server_calls.get(rpc.call_id) is rpc else None

    def export_state(self) -> tuple[dict[str, Any], list[socket.socket]]:
        """Plain data and sockets of the inbound connections (only when ``settled``;
        the calls waiting on them are exported with their server apps). Changes nothing."""
        docs, socks = [], []
        for conn in self.conns:
            if not conn.closed:
                doc, sock = export_conn(conn)
                docs.append(doc)
                socks.append(sock)
        return {"conns": docs, "counters": dict(self.counters)}, socks

    def import_state(self, state: Mapping[str, Any], socks: list[socket.socket]) -> list[Conn]:
        """Adopt ``export_state``'s connections; returns them in the same order."""
        conns = []
        for doc, sock in zip(state["conns"], socks, strict=True):
            conn = import_conn(
                doc,
                sock,
                self,
                self.poller,
                max_body=self.max_message_size,
                clock=self.ctx.clock,
                max_sendq=self.limits.max_send_queue,
            )
            ip = str(conn.info.get("ip"))
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            self.conns.add(conn)
            conns.append(conn)
            if wf.sync(conn, self.WIRE_FEATURES):  # the new code may understand more (or less)
                self.dirty.add(conn)
        self.counters.update(state.get("counters", {}))
        return conns

    def adopt_call(self, conn: Conn, rpc: Rpc, reserved: int) -> None:
        """A hot restart: ``rpc`` (its RxCall's origin is ``conn``) waits for its server
        app's answer; a CANCEL from the peer reaches it, the reply settles it."""
        rx: RxCall = rpc._state
        with conn.lock:
            conn.rx_calls[rx.wire_id] = (rx.port, reserved)
            conn.reserved += reserved
        conn.info.setdefault("routed", {})[rx.wire_id] = rpc

    def close(self) -> None:
        self.poller.unregister(self.listener.fileno())
        for conn in list(self.conns):
            conn.close("daemon shutting down")


ENGINE = TcpIngress  # for `mrpcctl engine upgrade tcp-ingress --module engines.tcp_ingress`
