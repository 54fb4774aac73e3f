"""The frontend engine: an application's rings on one side, the datapath on the other.

tx: drains the app's submit ring in batches, validates every descriptor (the
app is untrusted: connection, method, record offset, call id) and turns calls
and server replies into :class:`Rpc` items. A bad descriptor completes at once
with a gRPC status; nothing else is disturbed.

rx: turns replies, inbound calls and reclaim notices into completion
descriptors. A full completion ring is back-pressure: items wait in a backlog,
in order, and nothing is dropped.

Admission (engines/admission.py): an app at its quota of calls in flight, of
waiting completions or of bytes held gets no more CALLs taken from its ring
(they wait there; replies and releases behind them are still taken), and one
app's frontend runs at most ``limits.slice_us`` per round. A server app that
does not keep up gets further inbound calls refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from engines.admission import Admission, app_deadline, deadline_field
from libmrpc.status import StatusCode
from libmrpc.wire import metadata as md
from libmrpc.wire.errors import WireError
from libmrpc.wire.heap import HeapExhausted
from libmrpc.wire.marshal import TooBig
from libmrpc.wire.ring import (
    CMP_CANCEL,
    CMP_RECLAIM,
    CMP_REPLY,
    CMP_REQUEST,
    CMPF_DUPLICATE,
    CMPF_METADATA,
    DESCRIPTOR,
    HEADER_SIZE,
    SLOT_SIZE,
    SUB_CALL,
    SUB_CANCEL,
    SUB_RELEASE,
    SUB_REPLY,
    SUBF_METADATA,
    RingCorrupted,
)
from mrpcd.engine import (
    AppPort,
    EngineContext,
    FrontendEngine,
    Landed,
    MethodRef,
    Rpc,
    RpcKind,
    RxCall,
    TxCall,
    TxReply,
)

MAX_DETAILS = 16 * 1024
BATCH = 256  # descriptors taken per do_work at most
CHUNK = 32  # descriptors popped at a time (the time slice is checked between chunks)
_DUPLICATE = "duplicate call id"  # _state of the refusal of a duplicate call id


def to_clock(deadline: float | None, now: float) -> float | None:
    """An app's deadline (CLOCK_MONOTONIC seconds) on the daemon's clock, whose time is
    ``now`` (the same clock in production; an injected one in tests)."""
    return None if deadline is None else now + (deadline - time.monotonic())


def to_monotonic(deadline: float | None, now: float) -> float | None:
    """A deadline on the daemon's clock (time ``now``) in CLOCK_MONOTONIC seconds, for an app."""
    return None if deadline is None else time.monotonic() + (deadline - now)


class Frontend(FrontendEngine):
    NAME = "frontend"
    VERSION = 1

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        if ctx.port is None:
            raise ValueError("the frontend serves one application: its context needs a port")
        self.app: AppPort = ctx.port
        svc = ctx.services
        self.max_message_size = svc.max_message_size
        self.max_metadata_size = svc.max_metadata_size
        self.zero_copy_min = svc.tcp.zero_copy_min
        self.backlog: deque[Rpc] = deque()
        self.pending: deque[tuple[int, ...]] = deque()  # popped, not yet taken (<= CHUNK)
        self.held = False  # pending[0] is a CALL the quotas hold back
        self.quiesce = False  # hot restart: take no new CALL (export_state/import_state)
        self.admission = Admission(self.app, svc.limits)
        self.slice = self.admission.limits.slice_us / 1e6
        self._refs: dict[tuple[int, int], MethodRef] = {}
        self.outgoing: dict[int, Rpc] = {}  # this app's calls in flight (to cancel them)
        self.counters = {
            "submitted": 0,
            "completed": 0,
            "rejected_descriptors": 0,
            "refused_inbound": 0,
        }

    # ------------------------------------------------------------------ tx

    def do_work(self) -> int:
        if self.app.closed:
            return 0
        try:
            n = self._take()
        except RingCorrupted as e:
            self._broken(e)
            return 0
        return n + self._deliver()

    def _cancel(self, call_id: int) -> None:
        """SUB_CANCEL: the app cancelled its call. A CANCEL item goes down the datapath:
        the transport completes the call once with CANCELLED (and tells the peer
        daemon); a call still held by a policy fails so when it gets there."""
        rpc = self.outgoing.get(call_id)
        if rpc is None or rpc._cancelled:
            return  # already completed (or cancelled): nothing to do
        rpc._cancelled = True
        app = self.app
        self.tx_out.append(Rpc(RpcKind.CANCEL, app.name, app.pid, call_id, rpc.method, _state=rpc))

    def _take(self) -> int:
        """Take up to BATCH descriptors, for at most one time slice; a CALL the
        quotas hold back stays first in ``pending`` and stops the taking of
        CALLs (replies and releases are still taken). Raises RingCorrupted."""
        pending, submit = self.pending, self.app.submit
        if not pending and not submit.available():
            return 0  # the usual idle round: nothing posted
        stop = time.perf_counter() + self.slice
        n = 0
        while n < BATCH:
            if not pending:
                pending.extend(submit.pop_batch(DESCRIPTOR, CHUNK))
                if not pending:
                    break
            while pending:
                d = pending[0]
                if d[0] == SUB_CALL:
                    if self.quiesce:  # a hot restart: the next daemon takes it
                        return n + self._take_non_calls(BATCH - n)
                    self.held = not self._call(d)
                    if self.held:
                        return n + self._take_non_calls(BATCH - n)
                else:
                    self._other(d)
                pending.popleft()
                n += 1
            if time.perf_counter() >= stop:
                break
        return n

    def _take_non_calls(self, limit: int) -> int:
        """CALLs are held back: take the replies and releases queued behind them."""
        n = 0
        pending = self.pending
        if any(d[0] != SUB_CALL for d in pending):
            for d in [d for d in pending if d[0] != SUB_CALL]:
                self._other(d)
                n += 1
            kept = [d for d in pending if d[0] == SUB_CALL]
            pending.clear()
            pending.extend(kept)
        while n < limit and self._head_kind() not in (None, SUB_CALL):
            for d in self.app.submit.pop_batch(DESCRIPTOR, 1):
                if d[0] == SUB_CALL:  # the app rewrote the slot meanwhile
                    pending.append(d)
                    return n
                self._other(d)
                n += 1
        return n

    def _head_kind(self) -> int | None:
        """Kind of the oldest descriptor still in the submit ring (None: empty)."""
        submit = self.app.submit
        if not submit.available():
            return None
        return submit.buf[HEADER_SIZE + (submit.head & submit.mask) * SLOT_SIZE]

    def _other(self, d: tuple[int, ...]) -> None:
        kind, flags, status, _conn, call_id, _method, _aux, off, length, md_off = d
        app = self.app
        if kind == SUB_REPLY:
            self._reply(call_id, status, off, length, md_off if flags & SUBF_METADATA else 0)
        elif kind == SUB_RELEASE:
            try:
                app.recv_free(off)
            except ValueError:
                self.counters["rejected_descriptors"] += 1
                self.ctx.log.warning(
                    "app %r released receive-heap offset %d it does not hold", app.name, off
                )
        elif kind == SUB_CANCEL:
            self._cancel(call_id)
        else:
            self.counters["rejected_descriptors"] += 1
            self.ctx.log.warning("app %r posted a descriptor of unknown kind %d", app.name, kind)

    def _fail_call(
        self, call_id: int, code: StatusCode, details: str, state: object = None
    ) -> None:
        self.counters["rejected_descriptors"] += 1
        self.rx_in.append(
            Rpc(
                RpcKind.REPLY,
                self.app.name,
                self.app.pid,
                call_id,
                None,
                status=code,
                details=details,
                _state=state,
            )
        )

    def _call(self, d: tuple[int, ...]) -> bool:
        """Take one CALL descriptor; False when the quotas make it wait (untouched)."""
        _kind, flags, _status, conn_id, call_id, method_id, _aux, off, md_off, deadline_ns = d
        app = self.app
        if call_id in app.inflight:  # refuse it without touching the call that holds the id
            self._fail_call(
                call_id,
                StatusCode.INVALID_ARGUMENT,
                f"call id {call_id} is already in flight; this call was not sent",
                _DUPLICATE,
            )
            return True
        adm = self.admission
        if adm.wait_reason(len(self.backlog)) is not None:
            return False
        spec = app.conns.get(conn_id)
        if spec is None:
            self._fail_call(
                call_id,
                StatusCode.INVALID_ARGUMENT,
                f"call {call_id} names connection {conn_id}, which this app never opened",
            )
            return True
        binding = app.bindings[spec.slot]
        methods = binding.module.METHODS
        if not 0 <= method_id < len(methods):
            self._fail_call(
                call_id,
                StatusCode.UNIMPLEMENTED,
                f"method id {method_id} is not in schema {binding.schema_hash}",
            )
            return True
        info = methods[method_id]
        if info.client_streaming or info.server_streaming:
            self._fail_call(
                call_id,
                StatusCode.UNIMPLEMENTED,
                f"{info.path} is a streaming method; mrpc serves unary methods only",
            )
            return True
        if off <= 0 or off % 8 or off >= len(app.send_view):
            self._fail_call(
                call_id,
                StatusCode.INVALID_ARGUMENT,
                f"call {call_id}: request record offset {off} is outside the send heap",
            )
            return True
        now = self.ctx.clock.now()
        deadline = to_clock(app_deadline(deadline_ns, time.monotonic()), now)
        if deadline is not None and deadline <= now:
            self._fail_call(
                call_id,
                StatusCode.DEADLINE_EXCEEDED,
                f"call {call_id} to {info.path}: its deadline passed before mrpcd took it",
            )
            return True
        metadata: md.Metadata = ()
        if flags & SUBF_METADATA:
            try:
                metadata = self._metadata(md_off)
            except md.MetadataError as e:
                self._fail_call(call_id, e.status, f"call {call_id} to {info.path}: {e}")
                return True
        ref = self._refs.get((spec.slot, method_id))
        if ref is None:
            ref = self._refs[(spec.slot, method_id)] = MethodRef.of(info)
        rpc = Rpc(
            RpcKind.CALL,
            app.name,
            app.pid,
            call_id,
            ref,
            deadline=deadline,
            created=now,
            metadata=metadata,
            _state=TxCall(spec, binding, off),
        )
        max_size = adm.size_limit(self.max_message_size)
        try:
            self._marshal(rpc, binding.module, info.request, max_size)
        except TooBig as e:
            if max_size >= self.max_message_size:  # larger than max_message_size: no waiting helps
                self._fail_call(call_id, e.status, f"bad request for {info.path}: {e}")
                return True
            if adm.must_wait(e.at_least):
                return False
            self._fail_call(
                call_id,
                StatusCode.RESOURCE_EXHAUSTED,
                adm.too_big_details(f"request for {info.path}", e.at_least),
            )
            return True
        except WireError as e:
            self._fail_call(call_id, e.status, f"bad request for {info.path}: {e}")
            return True
        self.counters["submitted"] += 1
        adm.admit_call(call_id, rpc.size)
        self.outgoing[call_id] = rpc
        app.counters["calls"] += 1
        self.tx_out.append(rpc)
        return True

    def _metadata(self, off: int) -> md.Metadata:
        """The call's metadata block at send-heap ``off``, copied out once and checked."""
        view = self.app.send_view
        if off <= 0 or off % 8 or off >= len(view):
            raise md.MetadataError(f"metadata block offset {off} is outside the send heap")
        n = md.block_size(view, off)
        if n > self.max_metadata_size:
            raise md.MetadataError(
                f"metadata of {n} bytes exceeds the limit of "
                f"{self.max_metadata_size} bytes; send less metadata",
                StatusCode.RESOURCE_EXHAUSTED,
            )
        if off + n > len(view):
            raise md.MetadataError(f"metadata block of {n} bytes at {off} runs past the send heap")
        return md.decode(bytes(view[off : off + n]), self.max_metadata_size)

    def _reply(self, token: int, status: int, off: int, length: int, md_off: int = 0) -> None:
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
        trailing: md.Metadata = ()
        if md_off:
            try:
                trailing = self._metadata(md_off)
            except md.MetadataError as e:  # as gRPC: too large is RESOURCE_EXHAUSTED
                code = (
                    e.status if e.status is StatusCode.RESOURCE_EXHAUSTED else StatusCode.INTERNAL
                )
                details = f"server app {app.name!r} returned bad metadata with its reply: {e}"
        reply = Rpc(
            RpcKind.REPLY,
            app.name,
            app.pid,
            token,
            call.method,
            deadline=call.deadline,
            status=code,
            details=details,
            created=call.created,
            meta=call.meta,
            metadata=trailing,
            _state=TxReply(rx, off if code is StatusCode.OK else 0),
        )
        if code is StatusCode.OK:
            if off <= 0 or off % 8 or off >= len(app.send_view):
                reply.status = StatusCode.INTERNAL
                reply.details = (
                    f"server app {app.name!r} replied with a record offset outside its heap"
                )
                reply._state.rec_off = 0
            else:
                max_size = self.admission.size_limit(self.max_message_size)
                try:
                    self._marshal(
                        reply,
                        rx.binding.module,
                        call.method.response if call.method else "",
                        max_size,
                    )
                except TooBig as e:
                    reply.status = StatusCode.RESOURCE_EXHAUSTED
                    reply.details = (
                        f"server app {app.name!r} returned a reply too large: {e}"
                        if max_size >= self.max_message_size
                        else self.admission.too_big_details(
                            f"server app {app.name!r}'s reply", e.at_least
                        )
                    )
                    reply._state.rec_off = 0
                except (WireError, KeyError) as e:
                    reply.status = StatusCode.INTERNAL
                    reply.details = f"server app {app.name!r} returned a malformed reply: {e}"
                    reply._state.rec_off = 0
                else:
                    self.admission.admit_reply(token, reply.size)
        self.tx_out.append(reply)

    def _marshal(self, rpc: Rpc, module: Any, type_name: str, max_size: int) -> None:
        """Marshal the message once, here, so every policy knows its size; the
        transport sends exactly this. With a content policy attached the image is
        a daemon-private copy (what a policy checks is what goes out), else bulk
        fields stay zero-copy segments of the send heap. ``max_size`` is what is left
        of the app's byte quota (or max_message_size). Raises WireError (TooBig)."""
        st = rpc._state
        private = self.private_images
        head, segs = module.MARSHAL[type_name](
            self.app.send_view, st.rec_off, sys.maxsize if private else self.zero_copy_min, max_size
        )
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
        return bytes(view[off : off + min(length, MAX_DETAILS)]).decode("utf-8", "replace")

    # ------------------------------------------------------------------ rx

    def _push(
        self,
        kind: int,
        status: int,
        call_id: int,
        method: int,
        aux: int,
        off: int,
        length: int,
        deadline_ns: int = 0,
        flags: int = 0,
        conn: int = 0,
    ) -> bool:
        return self.app.complete.push(
            DESCRIPTOR, kind, flags, status, conn, call_id, method, aux, off, length, deadline_ns
        )

    def _land(self, landed: Landed) -> int:
        """Receive-heap offset of an image, copying a private one in first."""
        if landed.heap_off is not None:
            return landed.heap_off
        off = self.app.recv_alloc(landed.length)
        assert landed.private is not None
        self.app.recv_view[off : off + landed.length] = landed.private
        landed.heap_off, landed.private = off, None
        return off

    def _land_metadata(self, metadata: md.Metadata) -> int:
        """Receive-heap offset of ``metadata`` encoded for the app; raises HeapExhausted."""
        block = md.encode(metadata)
        at = self.app.recv_alloc(len(block))
        self.app.recv_view[at : at + len(block)] = block
        return at

    def _text(self, details: str) -> tuple[int, int]:
        data = details.encode()[:MAX_DETAILS]
        if not data:
            return 0, 0
        try:
            off = self.app.recv_alloc(len(data))
        except HeapExhausted:
            return 0, 0
        self.app.recv_view[off : off + len(data)] = data
        return off, len(data)

    def _complete(self, rpc: Rpc) -> bool:
        """Post one completion; False when the ring is full (retry later)."""
        app = self.app
        if app.complete.free_slots() == 0:
            return False
        if rpc.kind is RpcKind.REPLY:
            # refuses a second post of an id: not the call's outcome (compared by value:
            # an older copy of this module, before a live upgrade, may have made it)
            if type(rpc._state) is str and rpc._state == _DUPLICATE:
                off, n = self._text(rpc.details)
                return self._push(
                    CMP_REPLY, int(rpc.status), rpc.call_id, 0, 0, off, n, flags=CMPF_DUPLICATE
                )
            self.admission.release_call(rpc.call_id)
            self.outgoing.pop(rpc.call_id, None)
            landed = rpc._state if isinstance(rpc._state, Landed) else None
            md_at = 0
            if rpc.metadata:
                try:
                    md_at = self._land_metadata(rpc.metadata)
                except HeapExhausted as e:
                    if landed is not None and landed.heap_off is not None:
                        app.recv_free(landed.heap_off)
                        landed.heap_off = None
                    rpc.status, rpc.details = (
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"trailing metadata: {e}",
                    )
            md_flag = CMPF_METADATA if md_at else 0
            if rpc.status is StatusCode.OK and landed is not None:
                try:
                    off = self._land(landed)
                except HeapExhausted as e:
                    rpc.status, rpc.details = StatusCode.RESOURCE_EXHAUSTED, str(e)
                else:
                    app.counters["replies"] += 1
                    return self._push(
                        CMP_REPLY,
                        0,
                        rpc.call_id,
                        0,
                        0,
                        off,
                        landed.length,
                        flags=md_flag,
                        conn=md_at >> 3,
                    )
            app.counters["errors"] += 1
            off, n = self._text(rpc.details)
            return self._push(
                CMP_REPLY,
                int(rpc.status),
                rpc.call_id,
                0,
                0,
                off,
                n,
                flags=md_flag,
                conn=md_at >> 3,
            )
        if rpc.kind is RpcKind.CALL:
            rx: RxCall = rpc._state
            assert rx.landed is not None
            if rpc._cancelled:  # its caller cancelled it before it got here
                self.tx_out.append(
                    rpc.error_reply(StatusCode.CANCELLED, "the caller cancelled the call")
                )
                return True
            if self.admission.serving_full():
                self._refuse(
                    rpc,
                    f"server app {app.name!r} already holds "
                    f"{len(app.server_calls)} calls it has not answered "
                    f"(limits.calls_in_flight); retry later",
                )
                return True
            try:
                off = self._land(rx.landed)
            except HeapExhausted as e:
                self.tx_out.append(
                    rpc.error_reply(StatusCode.RESOURCE_EXHAUSTED, f"server app {app.name!r}: {e}")
                )
                return True
            md_at, md_flag = 0, 0
            if rpc.metadata:
                block = md.encode(rpc.metadata)
                try:
                    md_at = app.recv_alloc(len(block))
                except HeapExhausted as e:
                    app.recv_free(off)
                    rx.landed.heap_off = None
                    self.tx_out.append(
                        rpc.error_reply(
                            StatusCode.RESOURCE_EXHAUSTED, f"server app {app.name!r}: {e}"
                        )
                    )
                    return True
                app.recv_view[md_at : md_at + len(block)] = block
                md_flag = CMPF_METADATA
            method_id = rpc.method.id if rpc.method else 0
            app.server_calls[rpc.call_id] = rpc
            app.counters["served"] += 1
            return self._push(
                CMP_REQUEST,
                0,
                rpc.call_id,
                method_id,
                rx.binding.slot,
                off,
                rx.landed.length,
                deadline_field(to_monotonic(rpc.deadline, self.ctx.clock.now())),
                flags=md_flag,
                conn=md_at >> 3,
            )
        if rpc.kind is RpcKind.RECLAIM:
            self.admission.release_reply(rpc.call_id)
            return self._push(CMP_RECLAIM, 0, rpc.call_id, 0, 0, 0, 0)
        if rpc.kind is RpcKind.CANCEL:  # a remote caller cancelled an inbound call
            call = rpc._state
            if app.server_calls.get(rpc.call_id) is call:  # the app serves it: tell it
                return self._push(CMP_CANCEL, int(StatusCode.CANCELLED), rpc.call_id, 0, 0, 0, 0)
            if isinstance(call, Rpc):  # not delivered yet: refused when it gets here
                call._cancelled = True
        return True

    def _refuse(self, rpc: Rpc, details: str) -> None:
        """Answer an inbound call with RESOURCE_EXHAUSTED instead of delivering it."""
        self.counters["refused_inbound"] += 1
        self.tx_out.append(rpc.error_reply(StatusCode.RESOURCE_EXHAUSTED, details))

    def _broken(self, error: Exception) -> None:
        """The app wrote impossible ring counters: disconnect it (the daemon cleans up)."""
        app = self.app
        self.ctx.log.error(
            "app %r (pid %d) corrupted its rings (%s); disconnecting it", app.name, app.pid, error
        )
        app.disconnect(str(error))

    def _deliver(self) -> int:
        n = 0
        backlog, rx_in = self.backlog, self.rx_in
        full = False
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
                full = True
                break
            n += 1
        if full and rx_in:
            self._spill()
        if n:
            self.counters["completed"] += n
            self.app.wake_app()
        return n

    def _spill(self) -> None:
        """The completion ring is full: queue what arrived in the backlog, refusing
        inbound calls past ``limits.completion_backlog`` (the app is not reading)."""
        backlog, rx_in = self.backlog, self.rx_in
        bound = self.admission.limits.completion_backlog
        while rx_in:
            rpc = rx_in.popleft()
            if rpc.kind is RpcKind.CALL and len(backlog) >= bound:
                self._refuse(
                    rpc,
                    f"server app {self.app.name!r} is not reading its completions "
                    f"({len(backlog)} wait; limits.completion_backlog); retry later",
                )
            else:
                backlog.append(rpc)

    # ------------------------------------------------------------------ runtime hooks

    def prepare_sleep(self) -> bool:
        app = self.app
        if app.closed:
            return False
        app.submit.set_sleeping(True)
        try:
            if self.rx_in:
                return True
            if self.held or self.quiesce:  # CALLs wait (quota, hot restart); the rest not
                return self._head_kind() not in (None, SUB_CALL)
            return bool(self.pending) or app.submit.available() > 0
        except RingCorrupted:
            return False

    def next_timer(self) -> float | None:
        """Completions wait for ring room, or CALLs for quota: look again soon (the app
        does not signal that it has read its completion ring)."""
        if self.backlog or self.held:
            return self.ctx.clock.now() + 0.001
        return None

    def woke(self) -> None:
        if not self.app.closed:
            self.app.submit.set_sleeping(False)

    def statistics(self) -> dict[str, int | float]:
        adm = self.admission
        return dict(
            self.counters,
            backlog=len(self.backlog),
            pending=len(self.pending),
            inflight_bytes=self.app.bytes_inflight,
            too_big=adm.too_big,
            held=int(self.held),
            **{f"holds_{k}": v for k, v in adm.holds.items()},
        )

    def decompose(self) -> dict[str, Any]:
        state = {
            "backlog": list(self.backlog),
            "pending": list(self.pending),
            "counters": dict(self.counters),
            "refs": self._refs,
            "outgoing": dict(self.outgoing),
        }
        self.backlog.clear()
        self.pending.clear()
        return state

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        self.backlog.extend(state.get("backlog", ()))
        self.pending.extend(state.get("pending", ()))
        self.counters.update(state.get("counters", {}))
        self._refs.update(state.get("refs", {}))
        self.outgoing.update(state.get("outgoing", {}))

    # ------------------------------------------------------------------ hot restart

    def settled(self, waiting: bool = False) -> bool:
        """Quiescing for a hot restart: no completion waits for ring room, no reply
        or release is half taken; no call of this app's is in flight either, unless
        ``waiting`` (the hand-over then checks each is waiting at its transport)."""
        return (
            not self.backlog
            and (waiting or not self.outgoing)
            and all(d[0] == SUB_CALL for d in self.pending)
        )

    def export_state(self) -> dict[str, Any]:
        """Plain data for the next daemon (only when ``settled``): the descriptors
        popped from the submit ring and not yet taken, and the counters."""
        return {"pending": [tuple(d) for d in self.pending], "counters": dict(self.counters)}

    def import_state(self, state: Mapping[str, Any]) -> None:
        self.pending.extend(tuple(d) for d in state.get("pending", ()))
        self.counters.update(state.get("counters", {}))

    def adopt_calls(self, rpcs: list[Rpc]) -> None:
        """A hot restart: the app's calls the transport took over wait for their
        replies; count them in flight (quotas, cancel) as when they were taken."""
        for rpc in rpcs:
            self.outgoing[rpc.call_id] = rpc
            self.admission.admit_call(rpc.call_id, rpc.size)


ENGINE = Frontend
__all__ = ["ENGINE", "Frontend", "WireError"]
