"""Message memory: arenas of heap blocks, and the default heap new messages use.

How this works: an :class:`Arena` owns a list of blocks from one
:class:`~libmrpc._heap.Heap`. Small allocations bump inside the current chunk
(chunks start at 256 bytes and double up to 4 KiB; each chunk is zeroed once when
taken), allocations above 1 KiB get a block of their own. When the arena is
garbage-collected every block goes back to the heap (unless the heap is closed).
Message views hold a strong reference to their arena, so memory lives exactly as
long as some view of it. The arena also remembers array capacities and the element
views of growable arrays (see :mod:`libmrpc._message_views`).

With no default heap set, messages go to a lazily created process-private heap
(an anonymous mapping, so untouched pages cost nothing): messages work without
any daemon.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from typing import TYPE_CHECKING, Any

from libmrpc._heap import Heap

if TYPE_CHECKING:
    from libmrpc._message import Message

DEFAULT_HEAP_SIZE = 64 << 20
CHUNK_FIRST = 256
CHUNK_MAX = 4096
BIG = 1024  # allocations above this get their own heap block

_default_heap: Heap | None = None
_private_heap: Heap | None = None
_heap_lock = threading.Lock()


def set_default_heap(heap: Heap | None) -> None:
    """Make new messages allocate in ``heap`` (None: a process-private heap)."""
    global _default_heap
    _default_heap = heap


def default_heap() -> Heap:
    """The heap new messages allocate in (a lazily created private one by default)."""
    global _private_heap
    if _default_heap is not None:
        return _default_heap
    if _private_heap is None:
        with _heap_lock:
            if _private_heap is None:
                # an anonymous mapping: pages cost memory only once touched
                buf = memoryview(mmap.mmap(-1, DEFAULT_HEAP_SIZE))
                _private_heap = Heap(buf, name="private message heap")
    return _private_heap


_ZEROS: dict[int, memoryview] = {}


def zeros(n: int) -> memoryview:
    """A read-only all-zero buffer of ``n`` bytes (shared; the default record)."""
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = memoryview(bytes(n))
    return z


class Arena:
    """Blocks of one heap owned by a message tree; freed together on collection."""

    __slots__ = (
        "__weakref__",
        "_blocks",
        "_cur",
        "_end",
        "_next",
        "buf",
        "caps",
        "heap",
        "views",
    )

    def __init__(self, heap: Heap) -> None:
        self.heap = heap
        self.buf: memoryview = heap.buf
        self._blocks: list[int] = []
        self._cur = 0
        self._end = 0
        self._next = CHUNK_FIRST
        self.caps: dict[int, int] = {}  # array offset -> capacity in bytes
        self.views: dict[int, list[weakref.ref[Message]]] | None = None  # array -> elem views

    def alloc(self, n: int, zero: bool = True) -> int:
        """Offset of ``n`` fresh bytes, 8-byte aligned; zeroed unless ``zero`` is False.

        Raises :class:`~libmrpc._heap.HeapExhausted` when the heap is full.
        """
        n = (n + 7) & ~7 or 8
        cur = self._cur
        if cur + n <= self._end:
            self._cur = cur + n
            return cur
        heap = self.heap
        if n > BIG:
            off = heap.alloc(n)
            self._blocks.append(off)
            if zero:
                self.buf[off : off + n] = bytes(n)
            return off
        size = max(self._next, n)
        off = heap.alloc(size)
        self._blocks.append(off)
        self.buf[off : off + size] = zeros(size)
        self._cur, self._end = off + n, off + size
        self._next = min(size * 2, CHUNK_MAX)
        return off

    def track(self, array: int, view: Message) -> None:
        """Remember an element view of a growable array so a move can update it."""
        views = self.views
        if views is None:
            views = self.views = {}
        refs = views.get(array)
        if refs is None:
            refs = views[array] = []
        refs.append(weakref.ref(view))
        n = len(refs)
        if n >= 64 and not n & (n - 1):  # amortized pruning of dead views
            refs[:] = [r for r in refs if r() is not None]

    def moved(self, old: int, new: int, removed: int = -1, stride: int = 0) -> None:
        """Array ``old`` now lives at ``new`` (element ``removed`` dropped: later shift)."""
        views = self.views
        if not views or old not in views:
            return
        dest = views.setdefault(new, [])
        gone = old + removed * stride if removed >= 0 else -1
        delta = new - old
        for r in views.pop(old):
            v = r()
            if v is None or v._off == gone:
                continue  # dead, or the removed element: keeps its old memory (detached)
            v._off += delta - stride if gone >= 0 and v._off > gone else delta
            dest.append(r)

    def __del__(self) -> None:
        heap = self.heap
        if heap.closed:
            return
        blocks, self._blocks = self._blocks, []
        for off in blocks:
            try:
                heap.free(off)
            except Exception:  # noqa: BLE001, S112 - a finalizer must never raise
                continue


class ReadOnlyOwner:
    """A trivial owner for images in plain buffers (tests, private copies)."""

    __slots__ = ("__weakref__", "buf")

    def __init__(self, buf: Any) -> None:
        self.buf = buf
