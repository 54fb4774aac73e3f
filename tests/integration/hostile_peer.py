"""A hostile peer daemon for tests: raw TCP to a daemon's listen address.

Reusable by soak tests: open many connections, send partial or oversized
frames, never read, and measure what it costs the daemon (RSS, fds, threads
from /proc) while a well-behaved client keeps calling.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from libmrpc._heap import Heap
from libmrpc.wire.frames import (
    CALL,
    HELLO,
    FrameAssembler,
    FrameHeader,
    encode_header,
    encode_json_frame,
)


def proc_stats(pid: int) -> dict[str, int]:
    """VmRSS (KiB), open fds and threads of a process."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


def hello(schema_hash: str, services: list[str] | None = None, **extra: Any) -> bytes:
    return encode_json_frame(
        HELLO,
        {
            "version": 1,
            "schema_hash": schema_hash,
            "services": ["mrpctest.Test"] if services is None else services,
            "app": "hostile",
            "pid": 1,
            "daemon": "hostile",
            **extra,
        },
    )


def request_image(testing: Any, **fields: Any) -> bytes:
    """The wire image of an mrpctest.Request (what a CALL body carries)."""
    need = 4 * len(fields.get("payload", b"")) + (1 << 16)
    heap = Heap.private(1 << (need - 1).bit_length())
    msg = testing.Request.new(heap, **fields)
    head, segs = testing.MARSHAL["mrpctest.Request"](heap.buf, msg._off, 1 << 30, 1 << 30)
    return bytes(head) + b"".join(bytes(s) for s in segs)


def call_frame(image: bytes, call_id: int, method: int = 0, aux: int = 0) -> bytes:
    return encode_header(CALL, call_id=call_id, method=method, body_len=len(image), aux=aux) + image


class Peer:
    """One raw connection to a daemon's peer port."""

    def __init__(self, listen: str, timeout: float = 5.0) -> None:
        host, port = listen.rsplit(":", 1)
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        self.frames: list[tuple[FrameHeader, bytes]] = []
        self._asm = FrameAssembler(on_frame=lambda h, b: self.frames.append((h, bytes(b))))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_some(self, data: bytes) -> int:
        """Send without blocking; how many bytes the kernel took."""
        self.sock.setblocking(False)
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        finally:
            self.sock.setblocking(True)

    def read_frames(
        self, until: Callable[[list[tuple[FrameHeader, bytes]]], bool], timeout: float = 10.0
    ) -> list[tuple[FrameHeader, bytes]]:
        deadline = time.monotonic() + timeout
        while not until(self.frames) and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            self._asm.feed(data)
        return self.frames

    def closed_by_daemon(self, timeout: float) -> bool:
        """True if the daemon closes the connection within ``timeout`` (data is read and dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def open_peers(listen: str, n: int) -> list[Peer]:
    return [Peer(listen) for _ in range(n)]


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()
