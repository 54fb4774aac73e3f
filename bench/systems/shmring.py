"""The shared-memory floor: two SPSC index rings, a slot array, two semaphores.

How this works. The client creates one POSIX shared-memory segment and two
counting semaphores (``req``, ``rep``), tells the server their names over a TCP
handshake, and unlinks all three as soon as the server has opened them (so
nothing is left in /dev/shm even if either side crashes). Segment layout, with
``n`` slots::

    [submit ring: n x u32][completion ring: n x u32][pad to 64][slot 0]...[slot n-1]
    slot = [u32 length][pad to 8][payload: slot_size bytes], stride rounded to 64

To call, the client copies the request into a free slot, writes the slot index
at ``submit[head % n]`` and posts ``req``. The server waits on ``req``, reads
the index at its own tail, writes the reply into the same slot, writes the index
into the completion ring and posts ``rep``. Each post matches exactly one ring
entry and at most ``n`` calls are outstanding, so neither side needs shared
head/tail counters; the semaphores order the memory accesses.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import socket
import struct
import time
from typing import Any

import posix_ipc  # type: ignore[import-not-found]

from bench.clients import Window

STOP = 0xFFFFFFFF
U32 = struct.Struct("<I")
_names = itertools.count()


def _layout(slots: int, slot_size: int) -> tuple[int, int, int]:
    """(offset of slot 0, slot stride, total size)."""
    rings = 8 * slots
    first = (rings + 63) // 64 * 64
    stride = (8 + slot_size + 63) // 64 * 64
    return first, stride, first + stride * slots


def serve_one(conn: socket.socket, reply_size: int, deadline: float) -> None:
    """Serve one client ring until it sends STOP, the deadline passes, or it vanishes."""
    conn.settimeout(10.0)
    f = conn.makefile("rb")
    hello = json.loads(f.readline())
    n, slot_size = hello["slots"], hello["slot_size"]
    first, stride, size = _layout(n, slot_size)
    shm = posix_ipc.SharedMemory(hello["shm"])
    mm = mmap.mmap(shm.fd, size)
    shm.close_fd()
    req = posix_ipc.Semaphore(hello["req"])
    rep = posix_ipc.Semaphore(hello["rep"])
    conn.sendall(b"ok\n")
    view = memoryview(mm)
    sub = view[0 : 4 * n].cast("I")
    comp = view[4 * n : 8 * n].cast("I")
    reply = b"r" * reply_size
    tail = head = 0
    try:
        while time.monotonic() < deadline:
            try:
                req.acquire(1.0)
            except posix_ipc.BusyError:
                continue
            i = sub[tail % n]
            tail += 1
            if i == STOP:
                break
            base = first + i * stride
            # The request payload is view[base+8 : base+8+length]: a handler would
            # get it as a zero-copy view. The echo handler ignores it.
            U32.pack_into(mm, base, reply_size)
            view[base + 8 : base + 8 + reply_size] = reply
            comp[head % n] = i
            head += 1
            rep.release()
    finally:
        sub.release()
        comp.release()
        view.release()
        mm.close()
        req.close()
        rep.close()
        conn.close()


class ClientRing:
    def __init__(
        self, conn: socket.socket, mm: mmap.mmap, req: Any, rep: Any, slots: int, slot_size: int
    ) -> None:
        self.conn, self.mm, self.req, self.rep = conn, mm, req, rep
        self.n, self.slot_size = slots, slot_size
        self.first, self.stride, _ = _layout(slots, slot_size)
        self.view = memoryview(mm)
        self.sub = self.view[0 : 4 * slots].cast("I")
        self.comp = self.view[4 * slots : 8 * slots].cast("I")
        self.head = 0
        self.ctail = 0

    @classmethod
    def connect(cls, addr: tuple[str, int], slots: int, slot_size: int) -> ClientRing:
        tag = f"/mrpcbench-{os.getpid()}-{next(_names)}"
        _, _, size = _layout(slots, slot_size)
        shm = posix_ipc.SharedMemory(tag + "-shm", posix_ipc.O_CREX, size=size)
        req = rep = None
        try:
            mm = mmap.mmap(shm.fd, size)
            shm.close_fd()
            req = posix_ipc.Semaphore(tag + "-req", posix_ipc.O_CREX, initial_value=0)
            rep = posix_ipc.Semaphore(tag + "-rep", posix_ipc.O_CREX, initial_value=0)
            conn = socket.create_connection(addr, timeout=10.0)
            hello = {
                "shm": shm.name,
                "req": req.name,
                "rep": rep.name,
                "slots": slots,
                "slot_size": slot_size,
            }
            conn.sendall(json.dumps(hello).encode() + b"\n")
            if conn.makefile("rb").readline().strip() != b"ok":
                raise ConnectionError("shm-floor server refused the ring")
        finally:
            shm.unlink()
            for sem in (req, rep):
                if sem is not None:
                    sem.unlink()
        return cls(conn, mm, req, rep, slots, slot_size)

    def _submit(self, i: int, frame_len: int, payload: bytes) -> None:
        base = self.first + i * self.stride
        U32.pack_into(self.mm, base, frame_len)
        self.view[base + 8 : base + 8 + frame_len] = payload
        self.sub[self.head % self.n] = i
        self.head += 1
        self.req.release()

    def window(self, conc: int, req_size: int, duration: float, max_calls: int) -> Window:
        if conc > self.n or req_size > self.slot_size:
            raise ValueError(
                f"ring has {self.n} slots of {self.slot_size} B; asked for "
                f"{conc} calls of {req_size} B"
            )
        payload = b"x" * req_size
        sent_at = [0] * conc
        win = Window()
        lat = win.lat_ns
        clock = time.perf_counter_ns
        start = clock()
        deadline = start + int(duration * 1e9)
        for i in range(conc):
            sent_at[i] = clock()
            self._submit(i, req_size, payload)
        outstanding, done = conc, 0
        comp, n, rep = self.comp, self.n, self.rep
        while outstanding:
            try:
                rep.acquire(10.0)
            except posix_ipc.BusyError:
                raise TimeoutError("shm-floor server did not answer within 10 s") from None
            i = comp[self.ctail % n]
            self.ctail += 1
            now = clock()
            lat.append(now - sent_at[i])
            done += 1
            if now < deadline and done + outstanding <= max_calls:
                sent_at[i] = now
                self._submit(i, req_size, payload)
            else:
                outstanding -= 1
        win.count = done
        win.elapsed_s = (clock() - start) / 1e9
        return win

    def close(self) -> None:
        try:
            self.sub[self.head % self.n] = STOP
            self.req.release()
        finally:
            self.sub.release()
            self.comp.release()
            self.view.release()
            self.mm.close()
            self.req.close()
            self.rep.close()
            self.conn.close()
