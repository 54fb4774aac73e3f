"""A process's registration with its local mrpcd: rings, heaps, completions.

How this works: the first ``connect``/``Server`` for a prefix registers the
process with that daemon over its unix control socket and maps the shared
memory it receives. New messages are then built in the send heap (it becomes
the default heap). Calls are descriptors pushed on the submit ring; one reader
thread drains the completion ring in batches and resolves calls, hands
requests to the server, and frees reply memory when the daemon reclaims it.

Memory rules: a request stays alive (referenced by its call) until the daemon
completes the call, even if the caller gave up waiting; received messages are
released back to the daemon (batched) when the last view of them is dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libmrpc._control import check_reply, open_control, recv_msg, request, send_msg
from libmrpc._heap import Heap
from libmrpc._message import Arena, copy_message, set_default_heap
from libmrpc._paths import app_socket_path, check_daemon_peer, resolve_prefix
from libmrpc._shm import ShmLayout, drain, map_app_regions, notify
from libmrpc.status import RpcError, StatusCode
from libmrpc.wire import metadata as md
from libmrpc.wire.ring import (
    CMP_CANCEL,
    CMP_RECLAIM,
    CMP_REPLY,
    CMP_REQUEST,
    CMPF_DUPLICATE,
    CMPF_METADATA,
    DESCRIPTOR,
    SUB_CALL,
    SUB_CANCEL,
    SUB_RELEASE,
    SUB_REPLY,
    SUBF_METADATA,
    RingConsumer,
    RingProducer,
)

log = logging.getLogger(__name__)
SAFETY_SLEEP = 0.5
# The deadline (CLOCK_MONOTONIC ns, 0 = none) of the call a handler is serving: calls
# made inside the handler inherit it (the earlier of it and their own timeout).
CALL_DEADLINE: contextvars.ContextVar[int] = contextvars.ContextVar("mrpc_call_deadline", default=0)
RELEASE_PERIOD = 0.1  # how often an idle process hands released messages back


class RecvBlock:
    """Owns one receive-heap block; releasing happens when the last view is gone."""

    __slots__ = ("__weakref__", "off", "session")

    def __init__(self, session: Session, off: int) -> None:
        self.session = session
        self.off = off

    def __del__(self) -> None:
        self.session._releases.append(self.off)


_CALLBACKS_LOCK = threading.Lock()  # a completion and a late add_done_callback never both run it


class SendBlock:
    """Owns one send-heap block (a call's metadata) until the call completes."""

    __slots__ = ("heap", "off")

    def __init__(self, heap: Heap, off: int) -> None:
        self.heap = heap
        self.off = off

    def __del__(self) -> None:
        self.heap.free(self.off)


class Call:
    """One outstanding call; completed exactly once, from the reader thread."""

    __slots__ = (
        "_lock",
        "abandoned",
        "bg",
        "call_id",
        "callbacks",
        "cancelled",
        "done",
        "error",
        "metadata",
        "method",
        "request",
        "response_cls",
        "result",
        "trailing",
    )

    def __init__(self, call_id: int, request: Any, response_cls: Any, method: str) -> None:
        self.call_id = call_id
        self.request = request
        self.response_cls = response_cls
        self.method = method
        self._lock = threading.Lock()
        self._lock.acquire()
        self.result: Any = None
        self.error: RpcError | None = None
        self.done = False
        self.abandoned = False
        self.callbacks: list[Callable[[Call], None]] | None = None
        self.bg = False  # the background thread must lead until this completes
        self.metadata: Any = None  # the send-heap block of its metadata, alive until completion
        self.trailing: Any = ()  # the server's metadata (md.ReplyMetadata if it sent initial)
        self.cancelled = False  # the caller cancelled it (the daemon completes it with CANCELLED)

    def finish(self, result: Any, error: RpcError | None) -> None:
        with _CALLBACKS_LOCK:  # ordered against add_callback: each callback runs once
            self.result, self.error, self.done = result, error, True
            callbacks = self.callbacks
        self.request = self.metadata = None
        self._lock.release()
        if callbacks:
            for cb in callbacks:
                try:
                    cb(self)
                except Exception:
                    log.exception("call completion callback failed")

    def add_callback(self, cb: Callable[[Call], None]) -> None:
        """Run ``cb(self)`` exactly once when the call completes (now, if it has)."""
        with _CALLBACKS_LOCK:
            if not self.done:
                if self.callbacks is None:
                    self.callbacks = []
                self.callbacks.append(cb)
                return
        cb(self)

    def wait(self, timeout: float | None) -> bool:
        if self.done:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._lock.release()
            return True
        return self.done


class Session:
    def __init__(self, prefix: Path, name: str | None = None) -> None:
        self.prefix = prefix
        self.pid = os.getpid()
        self.name = name or Path(os.path.basename(sys.argv[0] or "python")).stem or f"pid{self.pid}"
        path = app_socket_path(prefix)
        self._ctl = open_control(path)
        try:
            check_daemon_peer(self._ctl, path)
        except RpcError:
            self._ctl.close()
            raise
        self._ctl_lock = threading.Lock()
        self._stale_replies = 0  # control replies that came too late for their request
        reply, fds = request(self._ctl, {"op": "register", "name": self.name, "pid": self.pid})
        self.app_id = reply["app_id"]
        self.daemon = reply.get("daemon", "")
        layout = ShmLayout(**reply["layout"])
        self.regions = map_app_regions(layout, fds)
        ctl = memoryview(self.regions.ctl)
        self.submit = RingProducer(ctl[: layout.ring_size], layout.ring_slots, name="submit ring")
        self.complete = RingConsumer(
            ctl[layout.ring_size :], layout.ring_slots, name="completion ring"
        )
        self.send_heap = Heap(memoryview(self.regions.send), name="send heap")
        self.recv_view = memoryview(self.regions.recv)
        self._submit_lock = (
            threading.RLock()
        )  # re-entered when completions read while pushing reply
        self._releases: deque[int] = deque()
        self._slots: dict[str, int] = {}
        self._conns: dict[tuple[str, int], int] = {}
        self.calls: dict[int, Call] = {}
        self.replies: dict[int, Any] = {}  # server token -> reply kept alive until reclaimed
        self._call_ids = itertools.count(1)
        self.server: Any = None
        self.closed = False
        self.close_reason = ""
        self._aio: dict[Any, list[tuple[Any, Call]]] = {}
        self._poll_lock = threading.Lock()
        self._poller = select.poll()  # efd readable, or the daemon hung up (not: a control reply)
        self._poller.register(self.regions.complete_efd, select.POLLIN)
        self._poller.register(self._ctl.fileno(), select.POLLRDHUP)
        self._bg_lock = threading.Lock()
        self._background = 0
        self._reader_wanted = threading.Event()
        self._loop: Any = None  # an asyncio loop that drains completions itself
        self.spin = int(os.environ.get("MRPC_SPIN_US", "0")) / 1e6
        set_default_heap(self.send_heap)
        self._reader = threading.Thread(
            target=self._read_loop, name="mrpc-completions", daemon=True
        )
        self._reader.start()

    # ------------------------------------------------------------------ control

    def control(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """One control request; with ``timeout``, DEADLINE_EXCEEDED when its reply takes
        longer (the late reply is read and dropped before the next request's)."""
        if self.closed:
            raise RpcError(StatusCode.UNAVAILABLE, f"mrpcd is gone: {self.close_reason}")
        with self._ctl_lock:
            if timeout is None and not self._stale_replies:
                return request(self._ctl, msg)[0]
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._stale_replies:
                self._await_reply(msg, deadline)
                _, fds = recv_msg(self._ctl)
                for fd in fds:
                    os.close(fd)
                self._stale_replies -= 1
            send_msg(self._ctl, msg)
            try:
                self._await_reply(msg, deadline)
            except RpcError:
                self._stale_replies += 1
                raise
            late, fds = recv_msg(self._ctl)
        for fd in fds:
            os.close(fd)
        return check_reply(late)

    def _await_reply(self, msg: dict[str, Any], deadline: float | None) -> None:
        """Wait until the control socket is readable, at most until ``deadline``."""
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([self._ctl], [], [], remaining)
        if not readable:
            raise RpcError(
                StatusCode.DEADLINE_EXCEEDED,
                f"mrpcd did not answer {msg.get('op')!r} within the call's timeout",
            )

    def bind(self, schema: Any, timeout: float | None = None) -> int:
        """Register a generated schema module with the daemon; returns its slot."""
        slot = self._slots.get(schema.SCHEMA_HASH)
        if slot is not None:
            return slot
        reply = self.control({"op": "bind_schema", "texts": dict(schema.TEXTS)}, timeout)
        if reply["schema_hash"] != schema.SCHEMA_HASH:
            raise RpcError(
                StatusCode.FAILED_PRECONDITION,
                f"mrpcd computed schema hash {reply['schema_hash']} where this app has "
                f"{schema.SCHEMA_HASH}: libmrpc and mrpcd versions differ; upgrade one",
            )
        self._slots[schema.SCHEMA_HASH] = slot = reply["slot"]
        log.info(
            "bound schema %s as slot %d (%s, %.2f ms)",
            schema.SCHEMA_HASH,
            slot,
            reply["how"],
            reply["bind_ms"],
        )
        return slot

    def open_conn(self, target: str, slot: int, timeout: float | None = None) -> int:
        key = (target, slot)
        conn = self._conns.get(key)
        if conn is None:
            conn = self._conns[key] = self.control(
                {"op": "connect", "addr": target, "slot": slot}, timeout
            )["conn_id"]
        return conn

    # ------------------------------------------------------------------ submitting

    def _push(
        self,
        kind: int,
        status: int,
        conn: int,
        call_id: int,
        method: int,
        off: int,
        length: int,
        deadline_ns: int,
        flags: int = 0,
    ) -> None:
        """Push one descriptor, waiting (back-pressure) while the ring is full."""
        with self._submit_lock:
            self._flush_releases()
            waited = 0.0
            while not self.submit.push(
                DESCRIPTOR, kind, flags, status, conn, call_id, method, 0, off, length, deadline_ns
            ):
                if self.closed:
                    raise RpcError(StatusCode.UNAVAILABLE, f"mrpcd is gone: {self.close_reason}")
                notify(self.regions.submit_efd)
                if not self._read_while_full():
                    time.sleep(min(0.001, 0.00005 + waited))
                    waited += 0.0001
            if self.submit.consumer_sleeping():
                notify(self.regions.submit_efd)

    def _read_while_full(self) -> bool:
        """The submit ring is full, maybe because the daemon holds our calls back until
        we read completions (its per-app quotas): read them here unless another
        thread leads (an event loop pushing many calls is the one that would read
        them). True if there were any."""
        if not self._poll_lock.acquire(blocking=False):
            return False
        try:
            batch = self.complete.pop_batch(DESCRIPTOR, 256)
            if batch:
                self._handle(batch)
            return bool(batch)
        finally:
            self._poll_lock.release()

    def _hand_back_releases(self) -> None:
        """Post pending RELEASE descriptors now; wake the daemon if it sleeps. Skipped
        while another thread pushes (it flushes them; a leader must not block here)."""
        if not self._submit_lock.acquire(blocking=False):
            return
        try:
            self._flush_releases()
            if self.submit.consumer_sleeping():
                notify(self.regions.submit_efd)
        finally:
            self._submit_lock.release()

    def _flush_releases(self) -> None:
        releases = self._releases
        while releases:
            off = releases[0]
            if not self.submit.push(DESCRIPTOR, SUB_RELEASE, 0, 0, 0, 0, 0, 0, off, 0, 0):
                return
            releases.popleft()

    def _own(self, msg: Any) -> Any:
        """``msg`` if it lives in this session's send heap, else a copy that does."""
        owner = getattr(msg, "_owner", None)
        if isinstance(owner, Arena) and owner.heap is self.send_heap and msg._w == 0:
            return msg
        return copy_message(msg, self.send_heap)

    def _metadata_block(self, metadata: Any) -> SendBlock | None:
        """The call's (or reply's trailing) metadata in the send heap (None when none)."""
        if not metadata:
            return None
        return self._heap_block(metadata)

    def _heap_block(self, metadata: Any, initial: Any = ()) -> SendBlock:
        """The block of ``metadata`` (and a reply's ``initial``) in the send heap."""
        try:
            block = md.encode(metadata, initial)
        except md.MetadataError as e:
            raise RpcError(e.status, f"cannot send metadata: {e}") from None
        owner = SendBlock(self.send_heap, self.send_heap.alloc(len(block)))
        self.send_heap.buf[owner.off : owner.off + len(block)] = block
        return owner

    def start_call(
        self,
        conn: int,
        method_id: int,
        path: str,
        request: Any,
        response_cls: Any,
        timeout: float | None,
        background: bool = False,
        metadata: Any = None,
    ) -> Call:
        if self.closed:
            raise RpcError(StatusCode.UNAVAILABLE, f"mrpcd is gone: {self.close_reason}")
        request = self._own(request)
        block = self._metadata_block(metadata)
        call_id = next(self._call_ids)
        call = Call(call_id, request, response_cls, path)
        call.metadata = block
        self.calls[call_id] = call
        if background:
            call.bg = True
            self.background(1)
        deadline_ns = time.monotonic_ns() + int(timeout * 1e9) if timeout is not None else 0
        inherited = CALL_DEADLINE.get()
        if inherited and (not deadline_ns or inherited < deadline_ns):
            deadline_ns = inherited
        try:
            if block is None:
                self._push(SUB_CALL, 0, conn, call_id, method_id, request._off, 0, deadline_ns)
            else:
                self._push(
                    SUB_CALL,
                    0,
                    conn,
                    call_id,
                    method_id,
                    request._off,
                    block.off,
                    deadline_ns,
                    SUBF_METADATA,
                )
        except BaseException:
            self.calls.pop(call_id, None)
            if call.bg:
                self.background(-1)
            raise
        return call

    def cancel(self, call: Call) -> bool:
        """Cancel ``call`` on both daemons and its server; False if it already completed.
        The daemon still completes it exactly once (CANCELLED, or its outcome if that won)."""
        if call.done or call.cancelled or self.closed:
            return False
        call.cancelled = True
        self._push(SUB_CANCEL, 0, 0, call.call_id, 0, 0, 0, 0)
        return True

    def abandon(self, call: Call) -> None:
        """The caller stopped waiting (deadline): let the background thread reap it."""
        with self._bg_lock:
            if call.done:
                return
            call.abandoned = True
            if not call.bg:
                call.bg = True
                self._background += 1
        self._reader_wanted.set()

    def send_reply(
        self,
        token: int,
        reply: Any,
        status: StatusCode = StatusCode.OK,
        details: str = "",
        trailing: Any = None,
        initial: Any = None,
    ) -> None:
        if not initial:  # the handler sent no initial metadata (nearly always)
            block = self._metadata_block(trailing)
        else:
            block = self._heap_block(trailing or (), initial)
        md_off, flags = (block.off, SUBF_METADATA) if block is not None else (0, 0)
        if status is StatusCode.OK:
            reply = self._own(reply)
            self.replies[token] = reply if block is None else (reply, block)
            self._push(SUB_REPLY, 0, 0, token, 0, reply._off, 0, md_off, flags)
            return
        arena = Arena(self.send_heap)
        data = details.encode()[:16000]
        off = arena.alloc(max(len(data), 1), zero=False)
        self.send_heap.buf[off : off + len(data)] = data
        self.replies[token] = arena if block is None else (arena, block)
        self._push(SUB_REPLY, int(status), 0, token, 0, off, len(data), md_off, flags)

    # ------------------------------------------------------------------ completions

    def needs_reader(self) -> bool:
        """Whether the background thread must lead: a server, futures or asyncio calls."""
        return self.server is not None or self._background > 0

    def background(self, delta: int) -> None:
        """Count completions that only the background thread may wait for."""
        with self._bg_lock:
            self._background += delta
        if delta >= 0:
            self._reader_wanted.set()

    def wait_call(self, call: Call, timeout: float | None) -> bool:
        """Wait for ``call`` (a sync caller); True when it completed.

        The waiting thread polls the completion ring itself when nobody else
        does (no thread hand-off on the reply path); otherwise it waits for the
        current leader to resolve its call.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not call.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return call.done
            if self._poll_lock.acquire(blocking=False):
                try:
                    self._lead(call, deadline)
                finally:
                    self._poll_lock.release()
                if self.needs_reader():
                    self._reader_wanted.set()
            else:
                call.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def _lead(self, call: Call | None, deadline: float | None) -> None:
        """Handle completions until ``call`` is done (or, for the background
        thread, until nothing needs it); block on the eventfd when idle."""
        complete, efd, ctl_fd = self.complete, self.regions.complete_efd, self._ctl.fileno()
        perf = time.perf_counter
        while not self.closed:
            batch = complete.pop_batch(DESCRIPTOR, 256)
            if batch:
                self._handle(batch)
                if call is not None and call.done:
                    return
                continue
            if self._releases:
                self._hand_back_releases()
            if call is None and not self.needs_reader():
                return
            if self.spin:
                spin_until = perf() + self.spin
                while perf() < spin_until and not complete.available():
                    pass
                if complete.available():
                    continue
            timeout = SAFETY_SLEEP
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    return
                timeout = min(timeout, SAFETY_SLEEP)
            complete.set_sleeping(True)
            try:
                if complete.available():
                    continue
                for fd, ev in self._poller.poll(timeout * 1000):  # only the leader polls
                    if fd == ctl_fd and ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                        # a draining daemon answers, then hangs up: both can be seen in
                        # one poll, so take what is on the ring before failing the rest
                        try:
                            while batch := complete.pop_batch(DESCRIPTOR, 256):
                                self._handle(batch)
                        except Exception:  # the rest fail below, as before
                            log.exception("completions left by mrpcd could not be read")
                        self._daemon_gone("mrpcd closed the connection (daemon stopped or crashed)")
                        return
            finally:
                if self._loop is None or self._loop.is_closed():
                    complete.set_sleeping(False)
            drain(efd)

    def _read_loop(self) -> None:
        """The background leader: serves servers, futures and asyncio callers."""
        try:
            while not self.closed:
                if not self.needs_reader():
                    self._reader_wanted.wait(RELEASE_PERIOD)
                    self._reader_wanted.clear()
                    if self._releases:  # batched releases of dropped replies
                        self._hand_back_releases()
                    continue
                with self._poll_lock:
                    self._lead(None, None)
        except Exception as e:  # the mapping went away or a bug: fail calls, do not hang them
            if not self.closed:
                log.exception("completion reader failed")
                self._daemon_gone(f"completion reader failed: {e}")

    def _handle(self, batch: list[tuple[int, ...]]) -> None:
        calls, recv = self.calls, self.recv_view
        for kind, flags, status, _conn, call_id, method, aux, off, length, deadline_ns in batch:
            if kind == CMP_REPLY and flags & CMPF_DUPLICATE:  # not the outcome of call_id
                if length:
                    self._releases.append(off)
                log.error("mrpcd refused a second call with id %d (a libmrpc bug?)", call_id)
                continue
            if kind == CMP_REPLY:
                call = calls.pop(call_id, None)
                trailing: md.Metadata = ()
                if flags & CMPF_METADATA:
                    trailing = self._read_metadata(_conn << 3)
                    if call is not None:
                        call.trailing = trailing
                if status == 0:
                    owner = RecvBlock(self, off)
                    if call is None or call.abandoned:
                        if call is not None:
                            self._finish(call, None, None)
                        continue  # late reply after a local timeout: the owner releases it now
                    try:
                        result = call.response_cls._from_image(recv, off, owner)
                    except Exception as e:  # noqa: BLE001 - whatever a bad reply image raises fails this call only
                        self._finish(
                            call, None, RpcError(StatusCode.INTERNAL, f"cannot read reply: {e}")
                        )
                        continue
                    self._finish(call, result, None)
                else:
                    details = (
                        bytes(recv[off : off + length]).decode("utf-8", "replace") if length else ""
                    )
                    if length:
                        self._releases.append(off)
                    if call is not None:
                        err = RpcError(StatusCode(status), details)
                        if trailing:
                            err._initial, err._trailing = md.split(trailing)  # type: ignore[attr-defined]
                        self._finish(call, None, err)
            elif kind == CMP_REQUEST:
                server = self.server
                if server is None:
                    self._releases.append(off)
                    self.send_reply(
                        call_id, None, StatusCode.UNIMPLEMENTED, "no server in this app"
                    )
                else:
                    metadata: md.Metadata = ()
                    if flags & CMPF_METADATA:  # a call's block has no initial section
                        _, metadata = md.split(self._read_metadata(_conn << 3))
                    server._dispatch(call_id, method, aux, off, length, deadline_ns, metadata)
            elif kind == CMP_RECLAIM:
                self.replies.pop(call_id, None)
            elif kind == CMP_CANCEL and self.server is not None:
                self.server._cancel(call_id)
        if self._aio:
            pending, self._aio = self._aio, {}
            here = _running_loop()
            for loop, items in pending.items():
                if loop is here:
                    _resolve_aio(items)  # we are the loop: no thread hand-off
                    continue
                try:
                    loop.call_soon_threadsafe(_resolve_aio, items)
                except RuntimeError:
                    pass  # the loop is closed; nobody is waiting

    def _read_metadata(self, at: int) -> md.Metadata:
        """Decode the metadata block the daemon landed at ``at`` and release it."""
        recv = self.recv_view
        try:
            return md.decode(bytes(recv[at : at + md.block_size(recv, at)]), 1 << 20)
        except md.MetadataError as e:
            log.error("mrpcd delivered unreadable metadata (%s); ignoring it", e)
            return ()
        finally:
            self._releases.append(at)

    def _finish(self, call: Call, result: Any, error: RpcError | None) -> None:
        with self._bg_lock:
            if call.bg:
                call.bg = False
                self._background -= 1
        call.finish(result, error)

    def attach_loop(self, loop: Any) -> bool:
        """Let ``loop`` drain completions itself (True if it is, or now is, attached).

        One event loop at a time reads the completion eventfd with ``add_reader``;
        its ``.aio`` calls then need neither the background thread nor a
        cross-thread hand-off. While a loop is attached the ring's sleeping flag
        stays set, so the daemon signals every completion batch.
        """
        current = self._loop
        if current is loop:
            return True
        if current is not None and not current.is_closed():
            return False
        try:
            loop.add_reader(self.regions.complete_efd, self._on_loop_readable)
        except (RuntimeError, NotImplementedError, ValueError):
            return False
        self._loop = loop
        self.complete.set_sleeping(True)
        return True

    def _on_loop_readable(self) -> None:
        drain(self.regions.complete_efd)
        if not self._poll_lock.acquire(blocking=False):
            return  # another leader is draining; it hands our results over
        try:
            while batch := self.complete.pop_batch(DESCRIPTOR, 256):
                self._handle(batch)
        except Exception as e:
            log.exception("completion handling on the event loop failed")
            self._daemon_gone(f"completion handling failed: {e}")
        finally:
            self._poll_lock.release()

    def add_aio(self, loop: Any, fut: Any, call: Call) -> None:
        """Resolve ``fut`` on ``loop`` when ``call`` completes (batched per loop)."""

        def done(c: Call) -> None:
            self._aio.setdefault(loop, []).append((fut, c))

        with _CALLBACKS_LOCK:
            if not call.done:
                if call.callbacks is None:
                    call.callbacks = []
                call.callbacks.append(done)
                return
        loop.call_soon_threadsafe(_resolve_aio, [(fut, call)])  # already complete: resolve directly

    def _daemon_gone(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        err = RpcError(
            StatusCode.UNAVAILABLE, f"{reason}; calls in flight were lost, retry once mrpcd is back"
        )
        calls, self.calls = self.calls, {}
        for call in calls.values():
            if not call.done:
                call.finish(None, err)
        if self._aio:
            for loop, items in self._aio.items():
                try:
                    loop.call_soon_threadsafe(_resolve_aio, items)
                except RuntimeError:
                    pass
            self._aio = {}
        log.warning("session with mrpcd ended: %s", reason)
        server = self.server
        if server is not None:
            server._session_lost(self, reason)  # a server registers again by itself

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = "session closed"
        set_default_heap(None)
        try:
            self._ctl.close()
        except OSError:
            pass


def _running_loop() -> Any:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve_aio(items: list[tuple[Any, Call]]) -> None:
    for fut, call in items:
        if fut.done():
            continue
        if call.error is not None:
            fut.set_exception(call.error)
        else:
            fut.set_result(call.result)


_sessions: dict[Path, Session] = {}
_sessions_lock = threading.Lock()


def get_session(prefix: str | os.PathLike[str] | None = None, name: str | None = None) -> Session:
    """The process's session with the daemon at ``prefix`` (created on first use)."""
    path = resolve_prefix(prefix).resolve()
    with _sessions_lock:
        s = _sessions.get(path)
        if s is None or s.closed or s.pid != os.getpid():
            s = _sessions[path] = Session(path, name)
        return s
