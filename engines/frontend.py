"""The frontend engine: an application's rings on one side, the datapath on the other.

tx: drains the app's submit ring in batches, validates every descriptor (the
app is untrusted: connection, method, record offset, call id) and turns calls
and server replies into :class:`Rpc` items. A bad descriptor completes at once
with a gRPC status; nothing else is disturbed.

rx: turns replies, inbound calls and reclaim notices into completion
descriptors. A full completion ring is back-pressure: items wait in a backlog,
in order, and nothing is dropped.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Mapping
from typing import Any

from libmrpc.heap import HeapExhausted
from libmrpc.ring import (
    CMP_RECLAIM,
    CMP_REPLY,
    CMP_REQUEST,
    DESCRIPTOR,
    SUB_CALL,
    SUB_CANCEL,
    SUB_RELEASE,
    SUB_REPLY,
    RingCorrupted,
)
from libmrpc.shm import drain
from libmrpc.status import StatusCode, WireError
from mrpcd.appstate import AppState, Landed, RxCall, TxCall, TxReply
from mrpcd.engine import Engine, EngineContext, MethodRef, Rpc, RpcKind

MAX_DETAILS = 16 * 1024
BATCH = 256


class Frontend(Engine):
    NAME = "frontend"
    VERSION = 1

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.app: AppState = ctx.services["app"]
        self.max_message_size: int = ctx.services.get("max_message_size", 256 << 20)
        tcp = ctx.services.get("tcp_config")
        self.zero_copy_min: int = tcp.zero_copy_min if tcp is not None else 2048
        self.backlog: deque[Rpc] = deque()
        self._refs: dict[tuple[int, int], MethodRef] = {}
        self.counters = {"submitted": 0, "completed": 0, "rejected_descriptors": 0}

    # ------------------------------------------------------------------ tx

    def do_work(self) -> int:
        app = self.app
        if app.closed:
            return 0
        n = 0
        try:
            batch = app.submit.pop_batch(DESCRIPTOR, BATCH)
        except RingCorrupted as e:
            self._broken(e)
            return 0
        for kind, _flags, status, conn, call_id, method, _aux, off, length, deadline_ns in batch:
            n += 1
            if kind == SUB_CALL:
                self._call(conn, call_id, method, off, deadline_ns)
            elif kind == SUB_REPLY:
                self._reply(call_id, status, off, length)
            elif kind == SUB_RELEASE:
                try:
                    app.recv_heap.free(off)
                except ValueError:
                    self.counters["rejected_descriptors"] += 1
                    self.ctx.log.warning("app %r released receive-heap offset %d it does not hold",
                                         app.name, off)
            elif kind == SUB_CANCEL:
                pass  # the daemon still completes the call once (deadline or reply)
            else:
                self.counters["rejected_descriptors"] += 1
                self.ctx.log.warning("app %r posted a descriptor of unknown kind %d", app.name, kind)
        return n + self._deliver()

    def _fail_call(self, call_id: int, code: StatusCode, details: str) -> None:
        self.counters["rejected_descriptors"] += 1
        self.rx_in.append(Rpc(RpcKind.REPLY, self.app.name, self.app.pid, call_id, None,
                              status=code, details=details))

    def _call(self, conn_id: int, call_id: int, method_id: int, off: int, deadline_ns: int) -> None:
        app = self.app
        self.counters["submitted"] += 1
        spec = app.conns.get(conn_id)
        if spec is None:
            return self._fail_call(call_id, StatusCode.INVALID_ARGUMENT,
                                   f"call {call_id} names connection {conn_id}, which this app never opened")
        binding = app.bindings[spec.slot]
        methods = binding.module.METHODS
        if not 0 <= method_id < len(methods):
            return self._fail_call(call_id, StatusCode.UNIMPLEMENTED,
                                   f"method id {method_id} is not in schema {binding.schema_hash}")
        info = methods[method_id]
        if info.client_streaming or info.server_streaming:
            return self._fail_call(call_id, StatusCode.UNIMPLEMENTED,
                                   f"{info.path} is a streaming method; mrpc serves unary methods only")
        if off <= 0 or off % 8 or off >= len(app.send_view):
            return self._fail_call(call_id, StatusCode.INVALID_ARGUMENT,
                                   f"call {call_id}: request record offset {off} is outside the send heap")
        if call_id in app.inflight:
            return self._fail_call(call_id, StatusCode.INVALID_ARGUMENT,
                                   f"call id {call_id} is already in flight")
        app.inflight.add(call_id)
        app.counters["calls"] += 1
        ref = self._refs.get((spec.slot, method_id))
        if ref is None:
            ref = self._refs[(spec.slot, method_id)] = MethodRef.of(info)
        rpc = Rpc(RpcKind.CALL, app.name, app.pid, call_id, ref,
                  deadline=deadline_ns / 1e9 if deadline_ns else None, created=self.ctx.clock.now(),
                  _state=TxCall(spec, binding, off))
        try:
            self._marshal(rpc, binding.module, info.request)
        except WireError as e:
            self.rx_in.append(rpc.error_reply(e.status, f"bad request for {info.path}: {e}"))
            return
        self.tx_out.append(rpc)

    def _reply(self, token: int, status: int, off: int, length: int) -> None:
        app = self.app
        call = app.server_calls.pop(token, None)
        if call is None:
            self.counters["rejected_descriptors"] += 1
            self.ctx.log.warning("app %r replied to unknown call token %d", app.name, token)
            self._push(CMP_RECLAIM, 0, token, 0, 0, 0, 0)
            return
        rx: RxCall = call._state
        details = ""
        try:
            code = StatusCode(status)
        except ValueError:
            code, details = StatusCode.UNKNOWN, f"server app returned invalid status {status}"
        if code is not StatusCode.OK and not details:
            details = self._read_details(off, length)
        reply = Rpc(RpcKind.REPLY, app.name, app.pid, token, call.method, deadline=call.deadline,
                    status=code, details=details, created=call.created, meta=call.meta,
                    _state=TxReply(rx, off if code is StatusCode.OK else 0))
        if code is StatusCode.OK:
            if off <= 0 or off % 8 or off >= len(app.send_view):
                reply.status = StatusCode.INTERNAL
                reply.details = f"server app {app.name!r} replied with a record offset outside its heap"
                reply._state.rec_off = 0
            else:
                try:
                    self._marshal(reply, rx.binding.module, call.method.response if call.method else "")
                except (WireError, KeyError) as e:
                    reply.status = StatusCode.INTERNAL
                    reply.details = f"server app {app.name!r} returned a malformed reply: {e}"
                    reply._state.rec_off = 0
        self.tx_out.append(reply)

    def _marshal(self, rpc: Rpc, module: Any, type_name: str) -> None:
        """Marshal the message once, here, so every policy knows its size; the
        transport sends exactly this. With a content policy attached the image is
        a daemon-private copy (what a policy checks is what goes out), else bulk
        fields stay zero-copy segments of the send heap. Raises WireError."""
        st = rpc._state
        dp = self.app.datapath
        private = dp is not None and dp.content
        head, segs = module.MARSHAL[type_name](
            self.app.send_view, st.rec_off, sys.maxsize if private else self.zero_copy_min,
            self.max_message_size)
        if private:
            for seg in segs:  # a fully private image has none; be safe anyway
                head += seg
            segs = []
            st.image = head
            cls = module.MESSAGES[type_name]
            rpc._view = lambda: cls._from_image(memoryview(head).toreadonly(), 0, st)
        st.wire = (head, segs)
        rpc.size = len(head) + sum(len(seg) for seg in segs)

    def _read_details(self, off: int, length: int) -> str:
        view = self.app.send_view
        if length <= 0 or off <= 0 or off + length > len(view):
            return ""
        return bytes(view[off:off + min(length, MAX_DETAILS)]).decode("utf-8", "replace")

    # ------------------------------------------------------------------ rx

    def _push(self, kind: int, status: int, call_id: int, method: int, aux: int, off: int,
              length: int, deadline_ns: int = 0) -> bool:
        return self.app.complete.push(DESCRIPTOR, kind, 0, status, 0, call_id, method, aux, off,
                                      length, deadline_ns)

    def _land(self, landed: Landed) -> int:
        """Receive-heap offset of an image, copying a private one in first."""
        if landed.heap_off is not None:
            return landed.heap_off
        off = self.app.recv_heap.alloc(landed.length)
        assert landed.private is not None
        self.app.recv_view[off:off + landed.length] = landed.private
        landed.heap_off, landed.private = off, None
        return off

    def _text(self, details: str) -> tuple[int, int]:
        data = details.encode()[:MAX_DETAILS]
        if not data:
            return 0, 0
        try:
            off = self.app.recv_heap.alloc(len(data))
        except HeapExhausted:
            return 0, 0
        self.app.recv_view[off:off + len(data)] = data
        return off, len(data)

    def _complete(self, rpc: Rpc) -> bool:
        """Post one completion; False when the ring is full (retry later)."""
        app = self.app
        if app.complete.free_slots() == 0:
            return False
        if rpc.kind is RpcKind.REPLY:
            app.inflight.discard(rpc.call_id)
            landed = rpc._state if isinstance(rpc._state, Landed) else None
            if rpc.status is StatusCode.OK and landed is not None:
                try:
                    off = self._land(landed)
                except HeapExhausted as e:
                    rpc.status, rpc.details = StatusCode.RESOURCE_EXHAUSTED, str(e)
                else:
                    app.counters["replies"] += 1
                    return self._push(CMP_REPLY, 0, rpc.call_id, 0, 0, off, landed.length)
            app.counters["errors"] += 1
            off, n = self._text(rpc.details)
            return self._push(CMP_REPLY, int(rpc.status), rpc.call_id, 0, 0, off, n)
        if rpc.kind is RpcKind.CALL:
            rx: RxCall = rpc._state
            assert rx.landed is not None
            try:
                off = self._land(rx.landed)
            except HeapExhausted as e:
                self.tx_out.append(rpc.error_reply(StatusCode.RESOURCE_EXHAUSTED,
                                                   f"server app {app.name!r}: {e}"))
                return True
            app.server_calls[rpc.call_id] = rpc
            app.counters["served"] += 1
            deadline_ns = int(rpc.deadline * 1e9) if rpc.deadline else 0
            method_id = rpc.method.id if rpc.method else 0
            return self._push(CMP_REQUEST, 0, rpc.call_id, method_id, rx.binding.slot, off,
                              rx.landed.length, deadline_ns)
        if rpc.kind is RpcKind.RECLAIM:
            return self._push(CMP_RECLAIM, 0, rpc.call_id, 0, 0, 0, 0)
        return True

    def _broken(self, error: Exception) -> None:
        """The app wrote impossible ring counters: disconnect it (the daemon cleans up)."""
        app = self.app
        self.ctx.log.error("app %r (pid %d) corrupted its rings (%s); disconnecting it", app.name, app.pid, error)
        app.closed = True
        on_broken = self.ctx.services.get("on_app_broken")
        if on_broken is not None:
            on_broken(app, str(error))

    def _deliver(self) -> int:
        n = 0
        backlog, rx_in = self.backlog, self.rx_in
        while backlog or rx_in:
            rpc = backlog.popleft() if backlog else rx_in.popleft()
            try:
                ok = self._complete(rpc)
            except RingCorrupted as e:
                backlog.appendleft(rpc)
                self._broken(e)
                return n
            if not ok:
                backlog.appendleft(rpc)
                break
            n += 1
        if n:
            self.counters["completed"] += n
            self.app.wake_app()
        return n

    # ------------------------------------------------------------------ runtime hooks

    def prepare_sleep(self) -> bool:
        app = self.app
        if app.closed:
            return False
        app.submit.set_sleeping(True)
        try:
            return app.submit.available() > 0 or bool(self.rx_in)
        except RingCorrupted:
            return False

    def woke(self) -> None:
        if not self.app.closed:
            self.app.submit.set_sleeping(False)

    def on_submit_event(self, _events: int) -> None:
        drain(self.app.submit_efd)

    def statistics(self) -> dict[str, int | float]:
        return dict(self.counters, backlog=len(self.backlog))

    def decompose(self) -> dict[str, Any]:
        state = {"backlog": list(self.backlog), "counters": dict(self.counters), "refs": self._refs}
        self.backlog.clear()
        return state

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        self.backlog.extend(state.get("backlog", ()))
        self.counters.update(state.get("counters", {}))
        self._refs.update(state.get("refs", {}))


ENGINE = Frontend
__all__ = ["ENGINE", "Frontend", "WireError"]
