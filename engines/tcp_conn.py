"""One non-blocking TCP connection between two daemons (both directions).

The I/O shell around :class:`libmrpc.wire.frames.FrameAssembler`: reads in batches
into a staging buffer, or straight into a body's final place (an application's
receive heap) when a large body is being received; writes queued frames with
one ``sendmsg`` per flush, scatter-gather, zero-copy from shared memory.
Callbacks registered with a queued frame run once the kernel has taken all of
its bytes (that is when the application may reuse that send-heap memory).

Memory per connection is small: the staging buffer is shared by every
connection read on the same thread (reads are synchronous and the assembler
copies out whatever it keeps), declined bodies are skipped, not stored. A peer
that does not read its replies gets back-pressure: once ``max_sendq`` bytes are
queued to it, its connection is no longer read (no new calls) until the queue
drains. Timestamps (``opened``, ``last_in``, ``frame_at``, ``out_since``,
``last_frame``) let the owner time out stalled or idle peers
(see :mod:`engines.tcp_limits`). ``close`` breaks every reference cycle.

Batching (the ``batch`` wire feature, negotiated per connection, see
:mod:`engines.tcp_features`): while ``batch`` is in ``features``, small frames
queued without a completion callback and without zero-copy views (everything
already copied: small calls, small replies, errors, cancels) are collected and
go out as one BATCH frame (one header, ``aux`` = frames, at most
MAX_BATCH_BODY bytes) when the connection flushes, or as they were when only
one is waiting. A frame that does not qualify first seals the batch, so the
order on the wire is the order of ``queue``. A BATCH received (only when
``batch`` is in ``accepts``) is taken apart here and each frame in it goes to
the owner exactly as if it had come alone; frames that change the connection
(HELLO, HELLO_ACK, FEATURES, BATCH) are refused inside one. The owner's
``counters`` get ``batched_frames`` (frames sent inside BATCH frames),
``batches_sent`` and ``batched_frames_received``.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from libmrpc.wire.errors import WireError
from libmrpc.wire.frames import (
    BATCH,
    FEATURES,
    FRAME_NAMES,
    HELLO,
    HELLO_ACK,
    MAX_BATCH_BODY,
    Body,
    FrameAssembler,
    FrameHeader,
    encode_header,
)

log = logging.getLogger(__name__)

STAGING = 256 * 1024
DIRECT_MIN = 64 * 1024  # a body with at least this much left is received in place
IOV_MAX = 1024
READS_PER_EVENT = 64
STAGED_PER_EVENT = 1 << 20  # bytes parsed from one connection before others get their turn
BATCH_ITEM_MAX = 16 << 10  # frames larger than this go alone, never in a BATCH
NOT_IN_BATCH = frozenset({HELLO, HELLO_ACK, FEATURES, BATCH})
_local = threading.local()


def _staging() -> memoryview:
    """This thread's staging buffer, shared by all its connections."""
    view: memoryview | None = getattr(_local, "staging", None)
    if view is None:
        view = _local.staging = memoryview(bytearray(STAGING))
    return view


EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLL_FAIL = select.EPOLLERR | select.EPOLLHUP


class OversizeReply(NamedTuple):
    """``conn.cur`` for a reply body skipped because it exceeds max_message_size (here,
    with the connection, not in tcp.py: a live upgrade hands connections to a new
    copy of tcp.py, whose checks must recognise what the old copy left)."""

    size: int


class ConnState(str, enum.Enum):
    CONNECTING = "connecting"  # outbound: the TCP connect is under way (HELLO queued)
    HELLO_SENT = "hello_sent"  # outbound: connected, HELLO sent, no HELLO_ACK yet
    AWAIT_HELLO = "await_hello"  # inbound: accepted, the peer's HELLO not in yet
    READY = "ready"  # handshake done: calls and replies flow
    GOAWAY = "goaway"  # outbound: the peer said GOAWAY; no new calls, the others finish
    CLOSED = "closed"  # the socket is closed; every call on it has its outcome


#: The peer connection's states: state -> {event: next state}. ``close`` is allowed
#: from anywhere; an event from the peer that its state lacks (a CALL before HELLO,
#: a second HELLO) is the peer's protocol error and closes the connection.
CONN_STATES: dict[ConnState, dict[str, ConnState]] = {
    ConnState.CONNECTING: {"connected": ConnState.HELLO_SENT},
    ConnState.HELLO_SENT: {"hello_ack": ConnState.READY, "goaway": ConnState.GOAWAY},
    ConnState.AWAIT_HELLO: {"hello": ConnState.READY},
    ConnState.READY: {"goaway": ConnState.GOAWAY},
    ConnState.GOAWAY: {"goaway": ConnState.GOAWAY},
    ConnState.CLOSED: {},
}
_CONNECTING, _CLOSED = ConnState.CONNECTING, ConnState.CLOSED  # identity checks: no enum hashing


class ConnOwner(Protocol):
    def frame_sink(self, conn: Conn, header: FrameHeader) -> memoryview | Body | None: ...
    def handle_frame(self, conn: Conn, header: FrameHeader, body: memoryview) -> None: ...
    def conn_closed(self, conn: Conn, reason: str) -> None: ...


class SendQueue:
    """Buffers to write, in order, with completion marks at byte positions."""

    def __init__(self) -> None:
        self.iov: deque[bytes | bytearray | memoryview] = deque()
        self.marks: deque[tuple[int, Callable[[], None]]] = deque()
        self.queued = 0
        self.sent = 0

    def __len__(self) -> int:
        return self.queued - self.sent

    def add(self, bufs: list[Any], done: Callable[[], None] | None = None) -> None:
        for b in bufs:
            n = len(b)
            if n:
                self.iov.append(b)
                self.queued += n
        if done is not None:
            self.marks.append((self.queued, done))

    def flush(self, sock: socket.socket) -> bool:
        """Write as much as the socket takes; True when everything went out."""
        iov = self.iov
        while iov:
            batch = list(iov) if len(iov) <= IOV_MAX else [iov[i] for i in range(IOV_MAX)]
            try:
                n = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return False
            self.sent += n
            while n:
                first = iov[0]
                size = len(first)
                if size <= n:
                    iov.popleft()
                    n -= size
                else:
                    iov[0] = memoryview(first)[n:]
                    n = 0
            self._fire()
        self._fire()
        return True

    def privatize(self, start: int, end: int) -> int:
        """Copy the unsent views among queue positions [start, end) into private
        bytes: their owner is about to reuse that memory. Returns bytes copied."""
        iov, pos, copied = self.iov, self.sent, 0
        for i in range(len(iov)):
            if pos >= end:
                break
            b = iov[i]
            n = len(b)
            if pos + n > start and isinstance(b, memoryview):
                iov[i] = bytes(b)
                copied += n
            pos += n
        return copied

    def _fire(self) -> None:
        marks = self.marks
        while marks and marks[0][0] <= self.sent:
            marks.popleft()[1]()

    def drop(self) -> list[Callable[[], None]]:
        """Forget unsent data; return the callbacks that never fired."""
        self.iov.clear()
        callbacks = [cb for _, cb in self.marks]
        self.marks.clear()
        self.sent = self.queued
        return callbacks


class Conn:
    def __init__(
        self,
        sock: socket.socket,
        owner: ConnOwner,
        poller: Any,
        *,
        peer: str,
        outbound: bool,
        max_body: int,
        connecting: bool = False,
        clock: Any = None,
        max_sendq: int = 8 << 20,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.owner: Any = owner
        self.poller = poller
        self.peer = peer
        self.outbound = outbound
        self.state = (
            ConnState.CONNECTING
            if connecting
            else ConnState.HELLO_SENT
            if outbound
            else ConnState.AWAIT_HELLO
        )
        self.assembler = FrameAssembler(
            self._sink, max_body=max_body, on_frame=self._dispatch, skip_oversize=True
        )  # owners fail that one call
        self.sendq = SendQueue()
        self.max_sendq = max_sendq
        self.read_paused = False  # back-pressure: the peer does not read what we send
        self.hold = False  # hot restart: stop reading at the next frame boundary (set_hold)
        self.cur: Any = None  # the owner's note about the body being received
        self.info: dict[str, Any] = {}  # handshake results and owner bookkeeping
        self.calls: set[int] = set()  # outbound: wire ids of calls awaiting a reply
        # inbound accounting (see engines.tcp_limits): wire id -> (server app, reserved bytes)
        self.rx_calls: dict[int, tuple[Any, int]] = {}
        self.reserved = 0
        self.lock = threading.Lock()
        self._clock = clock
        now = self.now()
        self.opened = self.last_in = self.frame_at = self.last_frame = now
        self.out_since: float | None = None  # when queued output last made progress
        self._frames_seen = 0
        self.pings, self.ping_window = 0, now  # PINGs seen in the current one-second window
        self._events = EPOLLIN | (EPOLLOUT if connecting else 0)
        self.bytes_in = self.bytes_out = self.frames_in = 0
        # wire features (engines.tcp_features): in use (both sides), taken (advertised
        # here, ever), last advertised here (None: no handshake yet), the peer's
        self.features: frozenset[str] = frozenset()
        self.accepts: frozenset[str] = frozenset()
        self.advertised: frozenset[str] | None = None
        self.peer_features: frozenset[str] = frozenset()
        self._batch: list[Any] = []  # small frames waiting to go out as one BATCH
        self._batch_len = self._batch_frames = 0
        poller.register(self.fd, self._events, self.on_event)

    def now(self) -> float:
        return self._clock.now() if self._clock is not None else time.monotonic()

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    @property
    def open(self) -> bool:
        """Connected and not closed: bytes may be read and written."""
        state = self.state
        return state is not _CONNECTING and state is not _CLOSED

    def move(self, event: str) -> ConnState:
        """Follow :data:`CONN_STATES`; a move the table lacks is the peer's protocol
        error (``WireError``, which closes the connection)."""
        nxt = CONN_STATES[self.state].get(event)
        if nxt is None:
            raise WireError(f"{event} when the connection is {self.state.value}")
        self.state = nxt
        return nxt

    def _sink(self, header: FrameHeader) -> memoryview | Body | None:
        if self.state is ConnState.CLOSED:
            raise WireError("connection closed")  # stops the assembler mid-feed
        if header.type == BATCH:
            if "batch" not in self.accepts:
                raise WireError("BATCH frame, which this daemon did not advertise")
            return None  # at most MAX_BATCH_BODY bytes, taken apart when complete
        return self.owner.frame_sink(self, header)

    def _inner_sink(self, header: FrameHeader) -> memoryview | Body | None:
        if header.type in NOT_IN_BATCH:
            raise WireError(f"{FRAME_NAMES[header.type]} frame inside a BATCH")
        return self._sink(header)

    def _unbatch(self, header: FrameHeader, body: memoryview) -> None:
        """Hand each frame of a BATCH to the owner, as if it had come alone."""
        inner = FrameAssembler(
            self._inner_sink,
            max_body=self.assembler.max_body,
            on_frame=self._dispatch,
            skip_oversize=True,
        )
        before = self.frames_in
        try:
            inner.feed(body)
            if inner.partial:
                raise WireError("BATCH frame ends inside a frame")
            if self.frames_in - before != header.aux:
                raise WireError(
                    f"BATCH frame announced {header.aux} frames, carried {self.frames_in - before}"
                )
        finally:
            inner.reset()
        counters = getattr(self.owner, "counters", None)
        if counters is not None:
            counters["batched_frames_received"] = (
                counters.get("batched_frames_received", 0) + header.aux
            )

    def _set_events(self, want: int) -> None:
        if want != self._events and self.state is not ConnState.CLOSED:
            self._events = want
            self.poller.modify(self.fd, want)

    # ---------------------------------------------------------------- writing

    def queue(
        self,
        bufs: list[Any],
        done: Callable[[], None] | None = None,
        *,
        frames: int = 1,
        batchable: bool = True,
    ) -> None:
        """Queue ``frames`` whole frames (``bufs``: headers and bodies); ``done``
        runs once the kernel took their last byte (or they were dropped)."""
        if self.state is ConnState.CLOSED:
            if done is not None:
                done()
            return
        if batchable and done is None and "batch" in self.features:
            size = 0
            for b in bufs:
                if type(b) is memoryview:  # zero-copy: its owner tracks queue positions
                    size = BATCH_ITEM_MAX + 1
                    break
                size += len(b)
            if size <= BATCH_ITEM_MAX:
                if self._batch_len + size > MAX_BATCH_BODY:
                    self.seal()
                self._batch.extend(bufs)
                self._batch_len += size
                self._batch_frames += frames
                return
        if self._batch:
            self.seal()
        self._add(bufs, done)

    def position(self) -> int:
        """The send-queue position the next queued byte will have (seals a batch)."""
        if self._batch:
            self.seal()
        return self.sendq.queued

    def seal(self) -> None:
        """Move the frames collected for a BATCH onto the send queue."""
        bufs, n = self._batch, self._batch_frames
        if not bufs:
            return
        self._batch, self._batch_len, self._batch_frames = [], 0, 0
        if n > 1:
            size = sum(len(b) for b in bufs)
            bufs.insert(0, encode_header(BATCH, body_len=size, aux=n))
            counters = getattr(self.owner, "counters", None)
            if counters is not None:
                counters["batched_frames"] = counters.get("batched_frames", 0) + n
                counters["batches_sent"] = counters.get("batches_sent", 0) + 1
        self._add(bufs, None)

    def _add(self, bufs: list[Any], done: Callable[[], None] | None) -> None:
        if not len(self.sendq):
            self.out_since = self.now()
        self.sendq.add(bufs, done)

    def flush(self) -> None:
        state = self.state
        if self._batch and state is not _CONNECTING and state is not _CLOSED:
            self.seal()
        if state is _CONNECTING or state is _CLOSED or not len(self.sendq):
            return
        before = self.sendq.sent
        try:
            empty = self.sendq.flush(self.sock)
        except OSError as e:
            self.close(f"write failed: {e.strerror or e}")
            return
        if self.sendq.sent != before:
            self.bytes_out += self.sendq.sent - before
            self.out_since = None if empty else self.now()
        if self.read_paused and len(self.sendq) <= self.max_sendq // 2:
            self.read_paused = False
            self.last_in = self.frame_at = self.now()  # stall timers restart with reading
        elif not self.read_paused and len(self.sendq) > self.max_sendq:
            self.read_paused = True
        want = (0 if self.read_paused or self.held else EPOLLIN) | (0 if empty else EPOLLOUT)
        self._set_events(want)

    # ---------------------------------------------------------------- hot restart

    @property
    def held(self) -> bool:
        """Reading stopped at a frame boundary for a hot restart (see ``set_hold``)."""
        return self.hold and not self.assembler.partial

    def set_hold(self, on: bool) -> None:
        """Hot restart: with ``on``, read only what completes the frame under way,
        then nothing (the rest stays in the kernel for the next daemon); off reads again."""
        self.hold = on
        if self.state is ConnState.CLOSED or self.state is ConnState.CONNECTING:
            return
        reading = not self.read_paused and not self.held
        self._set_events((EPOLLIN if reading else 0) | (EPOLLOUT if len(self.sendq) else 0))

    # ---------------------------------------------------------------- reading

    def on_event(self, events: int) -> None:
        if self.state is ConnState.CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(f"cannot connect to {self.peer}: {os.strerror(err)}")
                return
            if not events & (EPOLLOUT | EPOLL_FAIL):
                return
            self.move("connected")
            self.flush()
            if not len(self.sendq):
                self._set_events(EPOLLIN)
        if self.read_paused and events & EPOLL_FAIL:
            return self.close(f"{self.peer} hung up")
        if events & (EPOLLIN | EPOLL_FAIL) and not self.read_paused:
            self._read()
        if events & EPOLLOUT and self.state is not _CLOSED:
            self.flush()

    def _read(self) -> None:
        asm, sock, staging = self.assembler, self.sock, _staging()
        staged = 0
        for _ in range(READS_PER_EVENT):
            if staged >= STAGED_PER_EVENT:
                return  # level-triggered: the rest waits for the next round, after the others
            if self.state is ConnState.CLOSED or self.read_paused:
                return
            limit = len(staging)
            if self.hold:  # hot restart: up to the end of the frame under way, no further
                if not asm.partial:
                    self._set_events(EPOLLOUT if len(self.sendq) else 0)
                    return
                limit = asm.body_left if asm.in_body else asm.header_left
            try:
                window = asm.body_window() if asm.in_body else None
                if window is not None and len(window) >= DIRECT_MIN:
                    n = sock.recv_into(window)
                    if n == 0:
                        return self.close(f"{self.peer} closed the connection mid-frame")
                    self.bytes_in += n
                    self.last_in = self.now()
                    frame = asm.body_received(n)
                    if frame is not None:
                        self._dispatch(*frame)
                        self.frame_at = self.last_in
                    continue
                n = sock.recv_into(staging, limit)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                return self.close(f"read failed: {e.strerror or e}")
            if n == 0:
                return self.close(
                    "peer closed the connection"
                    if not asm.partial
                    else f"{self.peer} closed the connection mid-frame"
                )
            self.bytes_in += n
            staged += n
            now = self.last_in = self.now()
            was_partial, seen = asm.partial, self._frames_seen
            try:
                asm.feed(staging[:n])
            except WireError as e:
                return self.close(f"malformed frame from {self.peer}: {e}")
            if not was_partial or self._frames_seen != seen:
                self.frame_at = now  # the frame now half received started in this chunk
            if (
                self.state is not ConnState.CLOSED
                and not self.read_paused
                and len(self.sendq) > self.max_sendq
            ):
                self.read_paused = True  # the peer does not read: stop taking its calls
                self._set_events(EPOLLOUT)
            if n < limit and not self.hold:
                return

    def _dispatch(self, header: FrameHeader, body: memoryview) -> None:
        if self.state is ConnState.CLOSED:
            raise WireError("connection closed")
        self.frames_in += 1
        self._frames_seen += 1
        self.last_frame = self.last_in
        try:
            if header.type == BATCH:
                self.frames_in -= 1  # counted by the frames it carries
                self._unbatch(header, body)
            else:
                self.owner.handle_frame(self, header, body)
        except WireError as e:
            self.close(f"protocol error from {self.peer}: {e}")
        finally:
            self.cur = None

    def close(self, reason: str, *, level: int = logging.INFO) -> None:
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        log.log(
            level,
            "connection %s %s closed: %s",
            "to" if self.outbound else "from",
            self.peer,
            reason,
        )
        self.poller.unregister(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass
        for cb in self.sendq.drop():
            cb()
        owner = self.owner
        try:
            if owner is not None:
                owner.conn_closed(self, reason)
        finally:
            # break the cycles (conn <-> assembler's bound methods) and drop buffers now
            self.assembler.reset()
            self.sendq = SendQueue()
            self._batch, self._batch_len, self._batch_frames = [], 0, 0
            self.cur = None
            with self.lock:
                self.rx_calls.clear()
                self.reserved = 0


def connect_nonblocking(
    host: str, port: int, *, nodelay: bool, sndbuf: int | None, rcvbuf: int | None
) -> tuple[socket.socket, bool]:
    """Start a connect to an IP address (resolve names first, off the runtime
    thread: see engines.tcp_resolve); returns (socket, still_connecting).
    Raises OSError on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        configure(sock, nodelay=nodelay, sndbuf=sndbuf, rcvbuf=rcvbuf)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock, err != 0


def configure(
    sock: socket.socket, *, nodelay: bool, sndbuf: int | None, rcvbuf: int | None
) -> None:
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)


# ---------------------------------------------------------------- hot restart

#: Conn.info keys that outlive a hot restart (handshake results, a METADATA frame
#: waiting for its CALL); the rest is per-call bookkeeping, empty when settled.
HANDOVER_INFO = ("conn_id", "schema_hash", "peer_daemon", "peer_max", "ip", "hello", "metadata")


def conn_settled(conn: Conn, *, waiting: bool = False) -> bool:
    """Nothing of this connection's is half done: no partial frame, nothing queued,
    and (unless ``waiting``) no call awaiting an answer; a hot restart may hand it
    over as it is. With ``waiting`` calls fully sent (``calls``) or fully received
    (``rx_calls``) may wait for their answer: the owner exports them as data."""
    return (
        conn.state is not _CONNECTING
        and not conn.assembler.partial
        and not len(conn.sendq)
        and (waiting or (not conn.calls and not conn.rx_calls))
        and conn.cur is None
        and not conn._batch  # small frames waiting for their BATCH
    )


def export_conn(conn: Conn) -> tuple[dict[str, Any], socket.socket]:
    """A settled connection as plain data plus its socket (for SCM_RIGHTS)."""
    doc = {
        "peer": conn.peer,
        "outbound": conn.outbound,
        "state": conn.state.value,
        "info": {k: conn.info[k] for k in HANDOVER_INFO if k in conn.info},
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "frames_in": conn.frames_in,
        # wire features: what is in use, taken, advertised here, and the peer's
        "features": sorted(conn.features),
        "accepts": sorted(conn.accepts),
        "advertised": None if conn.advertised is None else sorted(conn.advertised),
        "peer_features": sorted(conn.peer_features),
    }
    return doc, conn.sock


def import_conn(
    doc: dict[str, Any],
    sock: socket.socket,
    owner: ConnOwner,
    poller: Any,
    *,
    max_body: int,
    clock: Any,
    max_sendq: int,
) -> Conn:
    """The next daemon's copy of an ``export_conn`` connection (same socket, same state)."""
    conn = Conn(
        sock,
        owner,
        poller,
        peer=str(doc["peer"]),
        outbound=bool(doc["outbound"]),
        max_body=max_body,
        clock=clock,
        max_sendq=max_sendq,
    )
    conn.state = ConnState(doc["state"])
    conn.info.update(doc["info"])
    conn.bytes_in = int(doc.get("bytes_in", 0))
    conn.bytes_out = int(doc.get("bytes_out", 0))
    conn.frames_in = int(doc.get("frames_in", 0))
    conn.features = frozenset(doc.get("features", ()))
    conn.accepts = frozenset(doc.get("accepts", ()))
    advertised = doc.get("advertised")
    conn.advertised = None if advertised is None else frozenset(advertised)
    conn.peer_features = frozenset(doc.get("peer_features", ()))
    return conn
