"""Calls between two applications of the same daemon, without TCP.

How this works. The ``local`` transport (:mod:`engines.local`) hands a call
whose target is this daemon straight to the server application: the router
finds the server app and method as the ingress would (:func:`send`), the
request image is copied once from the client's send heap into the server's
receive heap (or private memory when a receive-side policy reads content),
validated, and delivered (``AppPort.deliver``) with an :class:`RxCall` whose
``origin`` is the client transport's :class:`LocalOrigin`. The server's
datapath answers exactly as for a remote caller: its transport calls
``origin.owner.post(reply)``; ``post`` queues the reply for the client's
runtime, which copies it into the client's receive heap, validates it and
completes the call (:func:`complete`); the server app gets its RECLAIM at once
(the bytes were copied).

The client's :class:`~engines.tcp.TcpTransport` also completes local calls
(it never starts one): after a switch back from ``local`` to ``tcp`` the calls
still in flight locally finish through it. ``LocalOrigin`` plays the part of a
connection for the transport's bookkeeping (``calls``, ``peer``, ``closed``,
``flush``); the deque of posted replies is handed over by ``decompose``, so a
reply posted to the old instance during a switch is not lost.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from typing import Any

from libmrpc.status import RpcError, StatusCode
from libmrpc.wire.errors import WireError
from libmrpc.wire.heap import HeapExhausted
from mrpcd.engine import AppPort, Landed, MethodRef, Rpc, RpcKind, RxCall, TxCall, TxReply

log = logging.getLogger(__name__)
LOCAL_PEER = "this daemon (local transport)"


class LocalOrigin:
    """The client transport's side of its local calls (one per transport)."""

    peer = LOCAL_PEER

    def __init__(self, owner: Any) -> None:
        self.owner = owner  # the client's transport: post() takes the server's replies
        self.calls: set[int] = set()  # wire ids of local calls awaiting a reply
        self.routed: dict[int, tuple[Rpc, AppPort]] = {}  # wire id -> (server's Rpc, server)
        self.closed = False

    def flush(self) -> None:
        pass

    def cancel(self, wire_id: int) -> None:
        """The caller cancelled: tell the server app (as a CANCEL frame would)."""
        entry = self.routed.get(wire_id)
        if entry is None:
            return
        srv, port = entry
        if not port.closed:
            port.deliver(
                Rpc(RpcKind.CANCEL, port.name, port.pid, srv.call_id, srv.method, _state=srv)
            )


class GoneOrigin:
    """Where the answer to an inbound call goes when nobody waits for it any more
    (a hot restart found its caller's connection or app gone): the server app's
    reply is dropped and its memory given back, as for a caller that left."""

    peer = "a caller that is gone"
    closed = True

    def __init__(self) -> None:
        self.owner = self
        self.calls: set[int] = set()

    def post(self, reply: Rpc) -> None:
        drop(reply)

    def flush(self) -> None:
        pass


def _copy_into(dest: memoryview, head: Any, segs: list[Any]) -> None:
    pos = len(head)
    dest[:pos] = head
    for s in segs:
        dest[pos : pos + len(s)] = s
        pos += len(s)


def _image(port: AppPort, landed: Landed) -> memoryview:
    """A read-only view of a landed request (what the server's handler reads)."""
    if landed.private is not None:
        return memoryview(landed.private).toreadonly()
    off = landed.heap_off or 0
    return port.recv_view[off : off + landed.length].toreadonly()


def _free(port: AppPort, landed: Landed | None) -> None:
    if landed is not None and landed.heap_off is not None:
        try:
            port.recv_free(landed.heap_off)
        except ValueError:
            pass
        landed.heap_off = None


def send(tx: Any, rpc: Rpc, origin: LocalOrigin) -> None:
    """Deliver ``rpc`` (a marshalled CALL of ``tx``'s app) to the server app of
    this daemon; a refusal completes the call at once with the router's status."""
    st: TxCall = rpc._state
    assert rpc.method is not None and st.wire is not None
    try:
        port, binding, method = tx.router.route(
            st.binding.schema_hash, rpc.method.id, st.binding.services
        )
    except RpcError as e:
        return tx._fail(rpc, e.code(), e.details())
    head, segs = st.wire
    size = len(head) + sum(len(s) for s in segs)
    rpc.size = size
    if port.reads_content:  # a receive-side policy reads it first: private memory
        buf = bytearray(size)
        landed = Landed(None, size, buf)
        body = memoryview(buf)
    else:
        try:
            off = port.recv_alloc(size)
        except HeapExhausted as e:
            return tx._fail(rpc, StatusCode.RESOURCE_EXHAUSTED, f"server app {port.name!r}: {e}")
        landed = Landed(off, size)
        body = port.recv_view[off : off + size]
    _copy_into(body, head, segs)
    try:
        binding.module.VALIDATE[method.request](body)
    except WireError as e:
        _free(port, landed)
        return tx._fail(rpc, StatusCode.INVALID_ARGUMENT, f"malformed {method.request}: {e}")
    if port.closed:
        _free(port, landed)
        return tx._fail(rpc, StatusCode.UNAVAILABLE, f"server app {port.name!r} is gone")
    wire_id = rpc._wire_id = next(tx._wire_ids)
    now = tx.ctx.clock.now()
    srv = Rpc(
        RpcKind.CALL,
        port.name,
        port.pid,
        port.next_token(),
        MethodRef.of(method),
        deadline=rpc.deadline,
        size=size,
        created=now,
        metadata=rpc.metadata,
        peer=f"{tx.app.name!r} (pid {tx.app.pid}) at {LOCAL_PEER}",
        _state=RxCall(origin, wire_id, binding, landed, port),
    )
    cls = binding.module.MESSAGES[method.request]
    srv._view = lambda: cls._from_image(_image(port, landed), 0, landed)
    origin.routed[wire_id] = (srv, port)
    origin.calls.add(wire_id)
    tx.pending[wire_id] = (rpc, origin)
    if rpc.deadline is not None:
        heapq.heappush(tx.deadlines, (rpc.deadline, wire_id))
    tx.counters["local_calls"] = tx.counters.get("local_calls", 0) + 1
    port.deliver(srv)


def _reclaim(reply: Rpc, port: AppPort | None) -> None:
    if isinstance(reply._state, TxReply) and port is not None and not port.closed:
        port.deliver(Rpc(RpcKind.RECLAIM, port.name, port.pid, reply.call_id, None))


def drop(reply: Rpc) -> None:
    """A server's answer to a caller that is gone: give the server its memory back."""
    st = reply._state
    call: RxCall = st.call if isinstance(st, TxReply) else st
    if not isinstance(st, TxReply) and call.port is not None:
        _free(call.port, call.landed)
    _reclaim(reply, call.port)


def drain_dead(replies: deque[Rpc]) -> None:
    while True:
        try:
            drop(replies.popleft())
        except IndexError:
            return


def complete(tx: Any, reply: Rpc) -> None:
    """On the client's runtime: the server's answer (a REPLY with ``TxReply``
    state, or an error REPLY with the call's ``RxCall``) completes the local call."""
    st = reply._state
    call: RxCall = st.call if isinstance(st, TxReply) else st
    origin: LocalOrigin = call.origin
    origin.routed.pop(call.wire_id, None)
    entry = tx.pending.get(call.wire_id)
    if entry is None or entry[1] is not origin:  # expired or cancelled meanwhile
        tx.counters["late_replies"] += 1
        return drop(reply)
    del tx.pending[call.wire_id]
    origin.calls.discard(call.wire_id)
    rpc: Rpc = entry[0]
    if reply.status is not StatusCode.OK or not isinstance(st, TxReply) or st.wire is None:
        drop(reply)
        code = reply.status if reply.status is not StatusCode.OK else StatusCode.INTERNAL
        tx.counters["errors"] += 1
        err = rpc.error_reply(
            code, reply.details or "mrpcd: reply reached the transport unmarshalled"
        )
        err.metadata = reply.metadata
        tx.rx_out.append(err)
        return
    head, segs = st.wire
    size = len(head) + sum(len(s) for s in segs)
    try:
        off = tx.app.recv_alloc(size)
    except HeapExhausted as e:
        drop(reply)
        return tx._fail(rpc, StatusCode.RESOURCE_EXHAUSTED, f"no room for a {size}-byte reply: {e}")
    view = tx.app.recv_view[off : off + size]
    _copy_into(view, head, segs)
    drop(reply)  # copied: the server may reuse its reply's memory
    assert rpc.method is not None
    try:
        rpc._state.binding.module.VALIDATE[rpc.method.response](view)
    except WireError as e:
        _free(tx.app, Landed(off, size))
        return tx._fail(rpc, StatusCode.INTERNAL, f"malformed reply from the local server: {e}")
    tx.counters["replies_received"] += 1
    tx.rx_out.append(
        Rpc(
            RpcKind.REPLY,
            rpc.app,
            rpc.app_pid,
            rpc.call_id,
            rpc.method,
            size=size,
            created=rpc.created,
            meta=rpc.meta,
            metadata=reply.metadata,
            _state=Landed(off, size),
        )
    )
