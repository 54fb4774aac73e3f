"""A message heap: a byte buffer plus a thread-safe buddy allocator over it.

The allocator itself (offsets only, no I/O, no locks) is
:class:`libmrpc.wire.heap.BuddyAllocator`; this module adds the lock that lets
several threads of one process build messages in the same heap.
"""

from __future__ import annotations

import threading

from libmrpc.wire.heap import MIN_BLOCK, BuddyAllocator, HeapExhausted, HeapStatistics

__all__ = ["MIN_BLOCK", "BuddyAllocator", "Heap", "HeapExhausted", "HeapStatistics"]


class Heap:
    """A byte buffer plus a thread-safe allocator over it.

    ``buf`` is a writable memoryview for heaps this process allocates in. The
    buffer may be an ``mmap`` of shared memory or a private ``bytearray``.
    """

    def __init__(self, buf: memoryview, *, name: str = "heap", min_block: int = MIN_BLOCK) -> None:
        self.buf = buf
        self.name = name
        self._alloc = BuddyAllocator(len(buf), min_block=min_block, name=name)
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def private(cls, size: int, *, name: str = "private heap") -> Heap:
        """A heap in process-private memory (detached messages, tests)."""
        return cls(memoryview(bytearray(size)), name=name)

    @property
    def size(self) -> int:
        return self._alloc.size

    def alloc(self, n: int) -> int:
        with self._lock:
            return self._alloc.alloc(n)

    def free(self, off: int) -> None:
        with self._lock:
            if not self.closed:
                self._alloc.free(off)

    def block_size(self, off: int) -> int:
        with self._lock:
            return self._alloc.block_size(off)

    def statistics(self) -> HeapStatistics:
        with self._lock:
            return self._alloc.statistics()
