"""Runtime support for the generated MARSHAL and VALIDATE functions.

How this works: a generated ``MARSHAL[name](heap, off, zero_copy_min, max_size)``
creates a :class:`Marshal` state (which copies the root record into ``head``) and
then runs straight-line per-type code that reads each reference *from the private
copy in head* (so an application changing shared memory meanwhile cannot make us
read a value twice differently), bounds-checks it against the heap, and asks this
state to append the target: records and arrays are copied into ``head`` (8-byte
aligned), blobs of at least ``zero_copy_min`` bytes become zero-copy segments.
References to segments are patched in :meth:`Marshal.finish`, once the head
length is known. The image is ``head + b"".join(segs)``, with the root at 0 and
every reference relative to the image start.

Work is bounded for any input: a visit budget (a legitimate message cannot have
more records and blobs than its heap has 8-byte words, nor more than one per four
image bytes, and the daemon caps it at :data:`WORK` — ``limits.marshal_work``), a
depth limit, and a size limit checked before each copy. A repeated string/bytes
field is charged its elements' *total* length before any of them is copied, so
millions of references to one shared blob fail at once, not after seconds of
copying. Every failure is a :class:`WireError`; exceeding a size limit raises
:class:`TooBig`, which says how many bytes the message needs at least.
"""

from __future__ import annotations

import struct
from typing import Any, NoReturn

from libmrpc.status import StatusCode
from libmrpc.wire.errors import TooBig, WireError
from libmrpc.wire.layout import MAX_DEPTH

REF = struct.Struct("<II")
U32_MAX = 0xFFFFFFFF
_PAD = bytes(8)
DEFAULT_WORK = 1 << 18
#: Records and blobs one message may have (marshal) or records one image may
#: have (validate): each costs about a microsecond of daemon CPU. The daemon sets
#: it from ``limits.marshal_work`` with :func:`set_work_limit`.
WORK = DEFAULT_WORK


def set_work_limit(n: int) -> None:
    """Cap the records and blobs per message for every MARSHAL/VALIDATE in this process."""
    global WORK
    if type(n) is not int or n < 1:
        raise ValueError(f"work limit must be an integer >= 1, got {n!r}")
    WORK = n


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


class Marshal:
    """Marshalling state of one message (send side, untrusted heap)."""

    __slots__ = (
        "budget",
        "capped",
        "head",
        "hsize",
        "max",
        "name",
        "patches",
        "segbytes",
        "segs",
        "zc",
    )

    def __init__(
        self, heap: memoryview, off: Any, size: int, zero_copy_min: int, max_size: int, name: str
    ) -> None:
        self.name = name
        if type(off) is not int:
            raise WireError(f"{name}: record offset {_short(off)} is not an integer")
        hsize = len(heap)
        if off < 0 or off + size > hsize:
            raise WireError(
                f"{name}: root record at offset {off} (size {size}) is outside the heap "
                f"of {hsize} bytes"
            )
        self.hsize = hsize
        self.max = min(max_size, U32_MAX)
        if size > self.max:
            self.too_big(size)
        self.head = bytearray(heap[off : off + size])
        self.segs: list[memoryview] = []
        self.patches: list[tuple[int, int, int]] = []
        self.segbytes = 0
        self.zc = zero_copy_min
        # A legitimate message costs at most one visit per 8 heap bytes (arena blocks
        # are 8-aligned) and at most 2 per 9 image bytes (1-byte zero-copy blobs).
        budget = min(hsize // 8, self.max // 4) + 16
        self.capped = budget > WORK
        self.budget = WORK if self.capped else budget

    def bad(self, where: str, r: int, n: int, record: int = 0) -> NoReturn:
        if record and n != record:
            why = f"length {n} is not the record size {record}"
        else:
            why = f"it does not fit in the heap of {self.hsize} bytes"
        raise WireError(
            f"{where}: bad reference (offset {r}, length {n}): {why}", StatusCode.INVALID_ARGUMENT
        )

    def deep(self, where: str) -> NoReturn:
        raise WireError(
            f"{where}: message nesting deeper than {MAX_DEPTH} levels", StatusCode.INVALID_ARGUMENT
        )

    def too_big(self, more: int) -> NoReturn:
        need = len(getattr(self, "head", b"")) + getattr(self, "segbytes", 0) + more
        raise TooBig(
            f"{self.name}: marshalled message exceeds the limit of {self.max} bytes "
            f"(at least {need})",
            need,
        )

    def spend(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            if self.capped:
                raise WireError(
                    f"{self.name}: more than {WORK} records and blobs in one message "
                    "(the daemon's limits.marshal_work); send fewer, larger elements",
                    StatusCode.RESOURCE_EXHAUSTED,
                )
            raise WireError(
                f"{self.name}: more records and blobs than the heap can hold "
                "(shared or cyclic references)",
                StatusCode.INVALID_ARGUMENT,
            )

    def blob(self, heap: memoryview, r: int, n: int, slot: int) -> None:
        """Emit bytes heap[r:r+n] (checked) and point the ref at ``slot`` to them."""
        self.spend(1)
        head = self.head
        if len(head) + self.segbytes + n > self.max:
            self.too_big(n)
        if n >= self.zc:
            self.patches.append((slot, self.segbytes, n))
            self.segs.append(heap[r : r + n])
            self.segbytes += n
        else:
            p = len(head)
            head += heap[r : r + n]
            if n & 7:
                head += _PAD[: -n & 7]
            REF.pack_into(head, slot, p, n)

    def rec(self, heap: memoryview, r: int, size: int) -> int:
        """Copy one record (size is a multiple of 8); return its image offset."""
        self.spend(1)
        head = self.head
        p = len(head)
        if p + self.segbytes + size > self.max:
            self.too_big(size)
        head += heap[r : r + size]
        return p

    def arr(self, heap: memoryview, r: int, nbytes: int, count: int) -> int:
        """Copy an array of ``count`` elements; return its image offset."""
        self.spend(count)
        head = self.head
        p = len(head)
        if p + self.segbytes + nbytes > self.max:
            self.too_big(nbytes)
        head += heap[r : r + nbytes]
        if nbytes & 7:
            head += _PAD[: -nbytes & 7]
        return p

    def blobs(self, heap: memoryview, p: int, n: int, where: str) -> None:
        """Emit the blobs of an array of ``n`` refs already copied to head[p:]."""
        head, hsize = self.head, self.hsize
        # every element counts with its full length, shared or not: fail before copying
        with memoryview(head) as mv, mv[p : p + 8 * n] as refs, refs.cast("I") as words:
            total = sum(words[1::2])
        if len(head) + self.segbytes + total > self.max:
            self.too_big(total)
        for q in range(p, p + 8 * n, 8):
            r, m = REF.unpack_from(head, q)
            if m:
                if r + m > hsize:
                    self.bad(where, r, m)
                self.blob(heap, r, m, q)
            else:
                REF.pack_into(head, q, 0, 0)

    def finish(self) -> tuple[bytearray, list[memoryview]]:
        head = self.head
        hl = len(head)
        if hl + self.segbytes > self.max:
            self.too_big(0)
        for slot, rel, n in self.patches:
            REF.pack_into(head, slot, hl + rel, n)
        return head, self.segs


class Validate:
    """Validation state of one received image (refs relative to the image start)."""

    __slots__ = ("budget", "name", "size")

    def __init__(self, image: Any, size: int, name: str) -> None:
        self.name = name
        try:
            n = len(image)
        except TypeError:
            raise WireError(f"{name}: image is not a buffer") from None
        if n < size:
            raise WireError(
                f"{name}: image of {n} bytes is shorter than its root record ({size} bytes)"
            )
        self.size = n
        self.budget = min(n // 8 + 1, WORK)

    def bad(self, where: str, r: int, n: int, record: int = 0) -> NoReturn:
        if record and n != record:
            why = f"length {n} is not the record size {record}"
        else:
            why = f"it does not fit in the image of {self.size} bytes"
        raise WireError(f"{where}: bad reference (offset {r}, length {n}): {why}")

    def deep(self, where: str) -> NoReturn:
        raise WireError(f"{where}: message nesting deeper than {MAX_DEPTH} levels")

    def visit(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            if self.size // 8 + 1 > WORK:
                raise WireError(
                    f"{self.name}: more than {WORK} records in one message "
                    "(the receiving daemon's limits.marshal_work)",
                    StatusCode.RESOURCE_EXHAUSTED,
                )
            raise WireError(
                f"{self.name}: more records than the image can hold (shared or cyclic references)"
            )

    def refs(self, img: Any, r: int, n: int, where: str) -> None:
        size = self.size
        for rr, nn in struct.iter_unpack("<II", img[r : r + 8 * n]):
            if nn and rr + nn > size:
                self.bad(where, rr, nn)


def unexpected(name: str, e: BaseException) -> WireError:
    """Last-resort wrapper: any non-WireError escaping generated code (a bug)."""
    return WireError(f"{name}: malformed message (internal {type(e).__name__}: {e})")
