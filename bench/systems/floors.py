"""The floors: what Python itself can do between two processes on this host.

* ``tcp-floor``: length-prefixed ping-pong over loopback TCP with TCP_NODELAY.
  The server is one selector loop; the client keeps one connection per
  outstanding call (blocking fast path for a single call, a selector loop above).
* ``shm-floor``: the same echo over shared memory and two counting POSIX
  semaphores (``posix_ipc``), an mRPC data path in miniature with no daemon. See
  :mod:`bench.systems.shmring` for the layout.
* ``socket-stream``: a one-way bulk TCP stream, the reference for goodput.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.clients import Window
from bench.systems import StartContext, System, serving_while_parent_lives

LEN = struct.Struct("<I")


def _listen() -> socket.socket:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(512)
    return lsock


# ----------------------------------------------------------------------------- tcp-floor


class _Conn:
    """Receive state of one server connection: a growable buffer and a fill level."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(64 * 1024)
        self.view = memoryview(self.buf)
        self.have = 0

    def on_readable(self, reply: bytes) -> bool:
        """Read what is there, answer every complete request; False on EOF."""
        if self.have == len(self.buf):
            self._grow(len(self.buf) * 2)
        try:
            n = self.sock.recv_into(self.view[self.have :])
        except BlockingIOError:
            return True
        except OSError:
            return False
        if n == 0:
            return False
        self.have += n
        while self.have >= 4:
            (length,) = LEN.unpack_from(self.buf, 0)
            end = 4 + length
            if end > len(self.buf):
                self._grow(end)
            if self.have < end:
                break
            self.sock.setblocking(True)
            try:
                self.sock.sendall(reply)
            finally:
                self.sock.setblocking(False)
            rest = self.have - end
            if rest:
                self.buf[:rest] = self.buf[end : self.have]
            self.have = rest
        return True

    def _grow(self, size: int) -> None:
        new = bytearray(size)
        new[: self.have] = self.view[: self.have]
        self.view.release()
        self.buf, self.view = new, memoryview(new)


def serve_tcp_floor(args: argparse.Namespace, extra: list[str], ready: Callable[..., None]) -> None:
    reply = LEN.pack(args.reply_size) + b"r" * args.reply_size
    lsock = _listen()
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    ready({"addr": f"127.0.0.1:{lsock.getsockname()[1]}"})
    keep_serving = serving_while_parent_lives(args.lifetime)
    while keep_serving():
        for key, _ in sel.select(timeout=1.0):
            if key.data is None:
                try:
                    sock, _addr = lsock.accept()
                except BlockingIOError:
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, _Conn(sock))
                continue
            conn: _Conn = key.data
            if not conn.on_readable(reply):
                sel.unregister(conn.sock)
                conn.sock.close()


def _recv_exact(sock: socket.socket, view: memoryview, n: int) -> None:
    got = 0
    while got < n:
        r = sock.recv_into(view[got:n])
        if r == 0:
            raise ConnectionError("server closed the connection")
        got += r


class TcpFloorClient:
    def __init__(self, server: dict[str, Any], case: dict[str, Any]) -> None:
        host, port = server["addr"].rsplit(":", 1)
        self.addr = (host, int(port))
        self.reply_size = server["reply_size"]
        self.socks: list[socket.socket] = []
        self.frame = b""

    def open(self) -> dict[str, Any]:
        return {}

    def _ensure(self, conc: int, req_size: int) -> None:
        self.frame = LEN.pack(req_size) + b"x" * req_size
        while len(self.socks) < conc:
            s = socket.create_connection(self.addr, timeout=10.0)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(s)

    def window(self, conc: int, req_size: int, duration: float, max_calls: int) -> Window:
        self._ensure(conc, req_size)
        if conc == 1:
            return self._single(duration, max_calls)
        return self._multi(conc, duration, max_calls)

    def _single(self, duration: float, max_calls: int) -> Window:
        sock, frame = self.socks[0], self.frame
        want = 4 + self.reply_size
        buf = memoryview(bytearray(want))
        win = Window()
        lat = win.lat_ns
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(duration * 1e9)
        n = 0
        while n < max_calls:
            t0 = clock()
            if t0 >= deadline:
                break
            sock.sendall(frame)
            _recv_exact(sock, buf, want)
            lat.append(clock() - t0)
            n += 1
        win.count = n
        win.elapsed_s = (clock() - start) / 1e9
        return win

    def _multi(self, conc: int, duration: float, max_calls: int) -> Window:
        want = 4 + self.reply_size
        frame = self.frame
        sel = selectors.DefaultSelector()
        got = [0] * conc
        sent_at = [0] * conc
        bufs = [memoryview(bytearray(want)) for _ in range(conc)]
        win = Window()
        lat = win.lat_ns
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(duration * 1e9)
        for i in range(conc):
            sel.register(self.socks[i], selectors.EVENT_READ, i)
            sent_at[i] = clock()
            self.socks[i].sendall(frame)
        outstanding, n = conc, 0
        try:
            while outstanding and time.perf_counter_ns() < deadline + 10_000_000_000:
                for key, _ in sel.select(timeout=1.0):
                    i = key.data
                    r = self.socks[i].recv_into(bufs[i][got[i] :])
                    if r == 0:
                        raise ConnectionError("server closed the connection")
                    got[i] += r
                    if got[i] < want:
                        continue
                    got[i] = 0
                    now = clock()
                    lat.append(now - sent_at[i])
                    n += 1
                    if now < deadline and n + outstanding <= max_calls:
                        sent_at[i] = now
                        self.socks[i].sendall(frame)
                    else:
                        outstanding -= 1
        finally:
            sel.close()
        win.count = n
        win.elapsed_s = (clock() - start) / 1e9
        return win

    def close(self) -> None:
        for s in self.socks:
            s.close()


class TcpFloor(System):
    name = "tcp-floor"
    summary = "Python TCP_NODELAY ping-pong, two processes (floor)"
    driver = "bench.systems.floors:TcpFloorClient"

    def start(self, ctx: StartContext) -> dict[str, Any]:
        info = self.start_server(ctx, "tcp-floor", "server")
        return {"addr": info["addr"], "reply_size": ctx.reply_size}


# ----------------------------------------------------------------------------- shm-floor


def serve_shm_floor(args: argparse.Namespace, extra: list[str], ready: Callable[..., None]) -> None:
    from bench.systems import shmring

    lsock = _listen()
    ready({"addr": f"127.0.0.1:{lsock.getsockname()[1]}"})
    lsock.settimeout(1.0)
    deadline = time.monotonic() + args.lifetime
    keep_serving = serving_while_parent_lives(args.lifetime)
    while keep_serving():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        t = threading.Thread(
            target=shmring.serve_one, args=(conn, args.reply_size, deadline), daemon=True
        )
        t.start()


class ShmFloorClient:
    def __init__(self, server: dict[str, Any], case: dict[str, Any]) -> None:
        self.server = server
        self.case = case
        self.ring: Any = None

    def open(self) -> dict[str, Any]:
        from bench.systems import shmring

        host, port = self.server["addr"].rsplit(":", 1)
        self.ring = shmring.ClientRing.connect(
            (host, int(port)),
            slots=self.case["conc"],
            slot_size=max(self.case["req_size"], self.server["reply_size"]),
        )
        return {}

    def window(self, conc: int, req_size: int, duration: float, max_calls: int) -> Window:
        return self.ring.window(conc, req_size, duration, max_calls)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()


class ShmFloor(System):
    name = "shm-floor"
    summary = "Python shared memory + POSIX semaphores ping-pong, two processes (floor)"
    driver = "bench.systems.floors:ShmFloorClient"

    def check(self) -> None:
        try:
            import posix_ipc  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as exc:
            from bench.systems import Unavailable

            raise Unavailable(
                f"posix_ipc is not importable ({exc}); pip install posix-ipc"
            ) from exc

    def start(self, ctx: StartContext) -> dict[str, Any]:
        info = self.start_server(ctx, "shm-floor", "server")
        return {"addr": info["addr"], "reply_size": ctx.reply_size}


# ----------------------------------------------------------------------------- socket-stream

STREAM_CHUNK = 8 * 1024 * 1024


def _sink_one(conn: socket.socket) -> None:
    buf = memoryview(bytearray(STREAM_CHUNK))
    total = 0
    conn.settimeout(60.0)
    try:
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                break
            total += n
        conn.sendall(struct.pack("<Q", total))
    except OSError:
        pass
    finally:
        conn.close()


def serve_stream_sink(
    args: argparse.Namespace, extra: list[str], ready: Callable[..., None]
) -> None:
    lsock = _listen()
    ready({"addr": f"127.0.0.1:{lsock.getsockname()[1]}"})
    lsock.settimeout(1.0)
    keep_serving = serving_while_parent_lives(args.lifetime)
    while keep_serving():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_sink_one, args=(conn,), daemon=True).start()


class StreamClient:
    """Sends ``req_size`` chunks for the window, then half-closes and waits for the
    receiver's byte count, so data still in socket buffers is not counted as delivered."""

    def __init__(self, server: dict[str, Any], case: dict[str, Any]) -> None:
        host, port = server["addr"].rsplit(":", 1)
        self.addr = (host, int(port))

    def open(self) -> dict[str, Any]:
        return {}

    def window(self, conc: int, req_size: int, duration: float, max_calls: int) -> Window:
        chunk = b"x" * req_size
        win = Window()
        with socket.create_connection(self.addr, timeout=30.0) as s:
            start = time.perf_counter()
            deadline = start + duration
            n = 0
            while n < max_calls and time.perf_counter() < deadline:
                s.sendall(chunk)
                n += 1
            s.shutdown(socket.SHUT_WR)
            buf = memoryview(bytearray(8))
            _recv_exact(s, buf, 8)
            elapsed = time.perf_counter() - start
        (received,) = struct.unpack("<Q", buf)
        if received != n * req_size:
            raise RuntimeError(f"stream sink got {received} bytes, sent {n * req_size}")
        win.count = n
        win.elapsed_s = elapsed
        return win

    def close(self) -> None:
        pass


class SocketStream(System):
    name = "socket-stream"
    summary = "plain Python TCP stream, one direction (goodput reference)"
    driver = "bench.systems.floors:StreamClient"
    workloads = ("goodput",)

    def start(self, ctx: StartContext) -> dict[str, Any]:
        info = self.start_server(ctx, "stream-sink", "sink")
        return {"addr": info["addr"], "reply_size": 0}


SYSTEMS = (TcpFloor, ShmFloor, SocketStream)
SERVERS = {
    "tcp-floor": "bench.systems.floors:serve_tcp_floor",
    "shm-floor": "bench.systems.floors:serve_shm_floor",
    "stream-sink": "bench.systems.floors:serve_stream_sink",
}
