"""Single-producer/single-consumer rings of fixed-size slots in shared memory.

How this works: a ring region is

    [0:8)     head  u64  consumer's count of slots taken      (own cache line)
    [64:72)   tail  u64  producer's count of slots published  (own cache line)
    [128:136) sleeping u64  1 while the consumer is (about to be) blocked
    [192:...) slots, ``nslots`` x ``SLOT_SIZE`` bytes

The producer writes a slot, then publishes it by storing ``tail + 1``; the
consumer reads slots up to ``tail`` and then stores ``head``. Counters only grow
(64-bit, they do not wrap in practice); slot index = counter % nslots. A full
ring is back-pressure: ``push`` returns False and the caller keeps the item.

Notification is adaptive: a consumer about to block sets ``sleeping`` and
re-checks the ring; a producer that published while ``sleeping`` is set writes
the consumer's eventfd. Consumers block with a timeout as a safety net.

Each side keeps its own counter privately and reads the other side's counter
from shared memory; a reader that does not trust the other side (the daemon)
validates it (``RingCorrupted``) instead of trusting it.

Counters are read and written through a native ``memoryview.cast("Q")``: one
aligned 8-byte load or store each, which the other process can never see torn.
(``struct.pack_into`` must not be used for them: it zeroes the target first and
then writes byte by byte, so a concurrent reader can observe 0 or a mix.)

Pure memory code: no sockets, no threads; eventfd writes are the caller's job.
"""

from __future__ import annotations

import struct

from libmrpc.wire.errors import WireError

SLOT_SIZE = 64
HEADER_SIZE = 192
# indices into the header viewed as native u64 words
_HEAD, _TAIL, _SLEEPING = 0, 8, 16


class RingCorrupted(WireError):
    """The other side wrote an impossible counter into the ring header (a
    :class:`WireError`: the other side's fault; its session is ended)."""


def ring_bytes(nslots: int) -> int:
    """Bytes needed for a ring of ``nslots`` slots (a power of two)."""
    if nslots < 2 or nslots & (nslots - 1):
        raise ValueError(f"ring slots must be a power of two >= 2, got {nslots}")
    return HEADER_SIZE + nslots * SLOT_SIZE


class _RingSide:
    def __init__(self, buf: memoryview, nslots: int, *, name: str = "ring") -> None:
        if len(buf) < ring_bytes(nslots):
            raise ValueError(f"{name}: region of {len(buf)} bytes is too small for {nslots} slots")
        self.buf = buf
        self.words = buf[:HEADER_SIZE].cast("Q")  # atomic aligned 8-byte accesses
        self.nslots = nslots
        self.mask = nslots - 1
        self.name = name

    def _read(self, index: int) -> int:
        return self.words[index]

    def release(self) -> None:
        """Let go of the region's views so its mapping can be closed; the ring is
        unusable afterwards. Idempotent."""
        for view in (self.words, self.buf):
            view.release()

    @property
    def sleeping(self) -> bool:
        return self.words[_SLEEPING] != 0


class RingProducer(_RingSide):
    """The writing side. ``push`` copies ``SLOT_SIZE`` bytes or fewer into a slot."""

    def __init__(self, buf: memoryview, nslots: int, *, name: str = "ring") -> None:
        super().__init__(buf, nslots, name=name)
        self.tail = self._read(_TAIL)
        self._head_seen = self._read(_HEAD)

    def free_slots(self) -> int:
        head = self._read(_HEAD)
        used = self.tail - head
        if used < 0 or used > self.nslots:
            raise RingCorrupted(f"{self.name}: head {head} is inconsistent with tail {self.tail}")
        self._head_seen = head
        return self.nslots - used

    def push(self, packer: struct.Struct, *values: int) -> bool:
        """Pack ``values`` into the next slot and publish it; False when full."""
        if self.tail - self._head_seen >= self.nslots and self.free_slots() == 0:
            return False
        packer.pack_into(self.buf, HEADER_SIZE + (self.tail & self.mask) * SLOT_SIZE, *values)
        self.tail += 1
        self.words[_TAIL] = self.tail  # publish: the slot is complete before this store
        return True

    def consumer_sleeping(self) -> bool:
        return self.words[_SLEEPING] != 0


class RingConsumer(_RingSide):
    """The reading side; ``pop_batch`` decodes slots with the caller's Struct."""

    def __init__(self, buf: memoryview, nslots: int, *, name: str = "ring") -> None:
        super().__init__(buf, nslots, name=name)
        self.head = self._read(_HEAD)

    def available(self) -> int:
        tail = self._read(_TAIL)
        n = tail - self.head
        if n < 0 or n > self.nslots:
            raise RingCorrupted(f"{self.name}: tail {tail} is inconsistent with head {self.head}")
        return n

    def pop_batch(self, unpacker: struct.Struct, limit: int = 256) -> list[tuple[int, ...]]:
        """Decode and consume up to ``limit`` slots (oldest first)."""
        n = self.available()
        if not n:
            return []
        n = min(n, limit)
        buf, mask, head, unpack = self.buf, self.mask, self.head, unpacker.unpack_from
        out = [unpack(buf, HEADER_SIZE + ((head + i) & mask) * SLOT_SIZE) for i in range(n)]
        self.head = head + n
        self.words[_HEAD] = self.head
        return out

    def set_sleeping(self, value: bool) -> None:
        self.words[_SLEEPING] = 1 if value else 0


# ---------------------------------------------------------------- descriptors
#
# One layout serves both directions (48 of the 64 slot bytes):
#   kind u8 | flags u8 | status u16 | conn u32 | call_id u64 | method u32 | aux u32
#   | off u64 | length u64 | deadline_ns u64
DESCRIPTOR = struct.Struct("<BBHIQIIQQQ")
assert DESCRIPTOR.size <= SLOT_SIZE

# submit ring (app -> daemon)
SUB_CALL = 1  # conn, call_id, method, off=root record in send heap, deadline_ns (0 = none)
SUB_REPLY = 2  # call_id=server token, status; OK: off=root record; error: off/length=details utf-8
SUB_RELEASE = 3  # off = receive-heap block the app no longer reads
SUB_CANCEL = 4  # call_id: the caller gave up (deadline/cancel); the daemon still completes it once
# submit flags
SUBF_METADATA = 1  # SUB_CALL: length = send-heap offset of the call's metadata block;
#                   SUB_REPLY: deadline_ns = send-heap offset of the reply's metadata block
#                   (trailing, and initial when sent: libmrpc/metadata.py)

# completion ring (daemon -> app)
CMP_REPLY = 1  # call_id, status; off/length = image (OK) or details text (error) in receive heap
CMP_REQUEST = 2  # call_id=server token, method, aux=schema slot, off/length=image, deadline_ns
CMP_RECLAIM = 3  # call_id=server token: the reply's send-heap memory may be reused
CMP_CANCEL = 4  # call_id=server token: the caller cancelled the call (its reply is discarded)
# completion flags
CMPF_DUPLICATE = 1  # CMP_REPLY refusing a SUB_CALL whose call_id was already in flight: it
#                     is not the outcome of the call that holds that id
CMPF_METADATA = 2  # CMP_REQUEST / CMP_REPLY: conn = receive-heap offset / 8 of the call's
#                   metadata block (a reply's: trailing, and initial when sent)
