"""The buddy allocator behind every message heap: pure bookkeeping over offsets.

How this works: a binary buddy allocator over offsets. The heap is split into
blocks of ``min_block << order`` bytes; a request is rounded up to the next block
size, taken from the smallest non-empty free list and split down; a freed block
merges with its buddy (``offset ^ size``) while the buddy is free too. Metadata
lives in the owner's private memory (never in the shared mapping), so a peer that
scribbles on the heap cannot corrupt the allocator.

The first block is reserved, so offset 0 is never handed out and can mean "null".
"""

from __future__ import annotations

from dataclasses import dataclass

from libmrpc.status import RpcError, StatusCode

MIN_BLOCK = 64


class HeapExhausted(RpcError, MemoryError):
    """No free block is large enough; the heap is unchanged.

    An :class:`~libmrpc.status.RpcError` with ``RESOURCE_EXHAUSTED``: building a
    message in a full send heap raises it at once (it does not wait for memory
    to be reclaimed), so ``except RpcError`` around a call covers it. It is
    still a ``MemoryError`` for callers that caught that.
    """

    def __init__(self, details: str) -> None:
        RpcError.__init__(self, StatusCode.RESOURCE_EXHAUSTED, details)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # type: ignore[override]
        return (type(self), (self.details(),))


@dataclass(frozen=True, slots=True)
class HeapStatistics:
    size: int  # bytes managed
    used: int  # bytes in allocated blocks (after rounding up)
    allocations: int  # blocks currently allocated (the reserved block excluded)
    largest_free: int  # the largest request that would succeed now


class BuddyAllocator:
    """Offsets-only buddy allocator; not thread-safe (see :class:`Heap`)."""

    def __init__(self, size: int, *, min_block: int = MIN_BLOCK, name: str = "heap") -> None:
        if min_block <= 0 or min_block & (min_block - 1):
            raise ValueError(f"min_block must be a power of two, got {min_block}")
        if size < 2 * min_block:
            raise ValueError(f"{name}: size {size} is smaller than two blocks of {min_block}")
        self.name = name
        self.min_block = min_block
        self._shift = min_block.bit_length() - 1
        self.max_order = (size // min_block).bit_length() - 1
        self.size = min_block << self.max_order  # largest power-of-two block that fits
        self._free: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        self._free[self.max_order].add(0)
        self._allocated: dict[int, int] = {}
        self._used = 0
        self._reserved = self.alloc(min_block)

    def _order_for(self, n: int) -> int:
        blocks = (n + self.min_block - 1) >> self._shift
        return max(0, (blocks - 1).bit_length())

    def alloc(self, n: int) -> int:
        """Return the offset of a block of at least ``n`` bytes.

        Raises :class:`HeapExhausted` when no block is large enough, and
        ``ValueError`` for a negative size.
        """
        if n < 0:
            raise ValueError(f"{self.name}: cannot allocate {n} bytes")
        order = self._order_for(max(n, 1))
        free = self._free
        o = order
        while o <= self.max_order and not free[o]:
            o += 1
        if o > self.max_order:
            raise HeapExhausted(
                f"{self.name} exhausted: cannot allocate {n} bytes "
                f"(used {self._used} of {self.size}, largest free block "
                f"{self.largest_free()}); release messages sooner or raise the heap size"
            )
        off = free[o].pop()
        while o > order:
            o -= 1
            free[o].add(off + (self.min_block << o))
        self._allocated[off] = order
        self._used += self.min_block << order
        return off

    def free(self, off: int) -> None:
        """Return a block. Raises ``ValueError`` for an offset that is not allocated."""
        if off == self._reserved:
            raise ValueError(f"{self.name}: offset {off} is the reserved block; it is never freed")
        try:
            order = self._allocated.pop(off)
        except KeyError:
            raise ValueError(f"{self.name}: offset {off} is not an allocated block") from None
        self._used -= self.min_block << order
        free = self._free
        while order < self.max_order:
            buddy = off ^ (self.min_block << order)
            fl = free[order]
            if buddy not in fl:
                break
            fl.remove(buddy)
            off = min(off, buddy)
            order += 1
        free[order].add(off)

    def export_state(self) -> dict[str, object]:
        """The allocation state as plain data (a daemon hot restart hands it over)."""
        return {
            "size": self.size,
            "min_block": self.min_block,
            "free": [sorted(f) for f in self._free],
            "allocated": sorted(self._allocated.items()),
            "used": self._used,
            "reserved": self._reserved,
        }

    def import_state(self, state: dict[str, object]) -> None:
        """Take over ``export_state()`` of an allocator of the same size and block."""
        if state["size"] != self.size or state["min_block"] != self.min_block:
            raise ValueError(
                f"{self.name}: cannot import the state of a {state['size']}-byte heap with "
                f"{state['min_block']}-byte blocks into a {self.size}-byte heap with "
                f"{self.min_block}-byte blocks"
            )
        self._free = [set(f) for f in state["free"]]  # type: ignore[attr-defined]
        self._allocated = dict(state["allocated"])  # type: ignore[call-overload]
        self._used = int(state["used"])  # type: ignore[call-overload]
        self._reserved = int(state["reserved"])  # type: ignore[call-overload]

    def block_size(self, off: int) -> int:
        """Size of the allocated block at ``off``; ``ValueError`` if not allocated."""
        try:
            return self.min_block << self._allocated[off]
        except KeyError:
            raise ValueError(f"{self.name}: offset {off} is not an allocated block") from None

    def is_allocated(self, off: int) -> bool:
        return off in self._allocated and off != self._reserved

    def largest_free(self) -> int:
        for o in range(self.max_order, -1, -1):
            if self._free[o]:
                return self.min_block << o
        return 0

    def statistics(self) -> HeapStatistics:
        return HeapStatistics(
            size=self.size,
            used=self._used - self.min_block,
            allocations=len(self._allocated) - 1,
            largest_free=self.largest_free(),
        )
