"""The buddy allocator: rounding, coalescing, fragmentation, misuse, and a state
machine checking that live blocks never overlap and accounting stays exact."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from libmrpc._heap import MIN_BLOCK, BuddyAllocator, Heap, HeapExhausted, HeapStatistics

KIB = 1024


def fresh_stats(size: int) -> HeapStatistics:
    """A heap with nothing allocated: the reserved first block keeps the lower half split,
    so the largest free block is the upper half."""
    return HeapStatistics(size=size, used=0, allocations=0, largest_free=size // 2)


# ------------------------------------------------------------------ construction


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="min_block must be a power of two, got 48"):
        BuddyAllocator(4096, min_block=48)
    with pytest.raises(ValueError, match="min_block must be a power of two"):
        BuddyAllocator(4096, min_block=0)
    with pytest.raises(ValueError, match="tiny: size 127 is smaller than two blocks of 64"):
        BuddyAllocator(127, name="tiny")


def test_size_rounds_down_to_a_power_of_two_blocks() -> None:
    assert BuddyAllocator(1000).size == 512
    assert BuddyAllocator(64 * KIB).size == 64 * KIB
    assert BuddyAllocator(128).statistics() == HeapStatistics(128, 0, 0, 64)


# ------------------------------------------------------------------ alloc / free


def test_alloc_free_round_trip() -> None:
    a = BuddyAllocator(4 * KIB)
    assert a.statistics() == fresh_stats(4 * KIB)
    off = a.alloc(100)
    assert a.is_allocated(off) and a.block_size(off) == 128
    assert a.statistics().used == 128 and a.statistics().allocations == 1
    a.free(off)
    assert not a.is_allocated(off)
    assert a.statistics() == fresh_stats(4 * KIB)


@pytest.mark.parametrize(
    ("n", "block"),
    [
        (0, 64),
        (1, 64),
        (63, 64),
        (64, 64),
        (65, 128),
        (128, 128),
        (129, 256),
        (1000, 1024),
        (1024, 1024),
        (1025, 2048),
        (16 * KIB, 16 * KIB),
    ],
)
def test_sizes_round_up_to_blocks(n: int, block: int) -> None:
    a = BuddyAllocator(64 * KIB)
    off = a.alloc(n)
    assert a.block_size(off) == block
    assert off % block == 0  # buddy blocks are aligned to their size
    assert a.statistics().used == block


def test_min_block_parameter() -> None:
    a = BuddyAllocator(4 * KIB, min_block=256)
    off = a.alloc(1)
    assert a.block_size(off) == 256 and off % 256 == 0 and off != 0
    assert a.statistics().used == 256


def test_buddies_coalesce_back() -> None:
    """Freeing every block in any order merges buddies back to the initial free lists."""
    a = BuddyAllocator(16 * KIB)
    offs = [a.alloc(n) for n in (64, 64, 128, 256, 64, 512, 1024, 2048, 64, 4096)]
    assert len(set(offs)) == len(offs)
    for off in offs[::2] + offs[1::2]:
        a.free(off)
    assert a.statistics() == fresh_stats(16 * KIB)
    big = a.alloc(8 * KIB)  # the whole upper half, in one block again
    assert big == 8 * KIB and a.block_size(big) == 8 * KIB
    with pytest.raises(HeapExhausted):
        a.alloc(8 * KIB)


def test_offset_zero_is_never_returned() -> None:
    a = BuddyAllocator(8 * KIB)
    offs = []
    while True:
        try:
            offs.append(a.alloc(1))
        except HeapExhausted:
            break
    assert 0 not in offs
    assert len(offs) == 8 * KIB // MIN_BLOCK - 1  # every block but the reserved one
    assert a.statistics().used == 8 * KIB - MIN_BLOCK
    assert a.statistics().largest_free == 0


# ------------------------------------------------------------------ fragmentation and exhaustion


def test_fragmentation_then_recovery() -> None:
    size = 16 * KIB
    a = BuddyAllocator(size, name="recv heap of 'kv'")
    small = [a.alloc(64) for _ in range(size // 64 - 1)]
    for off in small[::2]:
        a.free(off)
    st_ = a.statistics()
    assert st_.largest_free == 64
    assert st_.used == 64 * len(small[1::2])
    with pytest.raises(HeapExhausted) as info:
        a.alloc(128)
    msg = str(info.value)
    assert "recv heap of 'kv' exhausted: cannot allocate 128 bytes" in msg
    assert f"used {st_.used + 64} of {size}" in msg  # counts the reserved block
    assert "largest free block 64" in msg
    assert "raise the heap size" in msg
    assert a.statistics() == st_  # a failed alloc leaves the heap unchanged
    for off in small[1::2]:
        a.free(off)
    assert a.statistics() == fresh_stats(size)
    assert a.block_size(a.alloc(size // 2)) == size // 2


def test_exhaustion_message_and_type() -> None:
    a = BuddyAllocator(4 * KIB, name="send heap")
    with pytest.raises(
        MemoryError,
        match=r"send heap exhausted: cannot allocate 4096 bytes "
        r"\(used 64 of 4096, largest free block 2048\)",
    ):
        a.alloc(4 * KIB)  # larger than the largest block (the upper half)
    with pytest.raises(HeapExhausted, match="cannot allocate 1000000 bytes"):
        a.alloc(1_000_000)


# ------------------------------------------------------------------ misuse


def test_double_free_and_bad_offsets() -> None:
    a = BuddyAllocator(4 * KIB, name="h")
    off = a.alloc(64)
    a.free(off)
    with pytest.raises(ValueError, match=f"h: offset {off} is not an allocated block"):
        a.free(off)
    big = a.alloc(256)
    for bad in (big + 64, 3, 4 * KIB, 10**9, -64):
        with pytest.raises(ValueError, match=f"offset {bad} is not an allocated block"):
            a.free(bad)
        with pytest.raises(ValueError):
            a.block_size(bad)
    with pytest.raises(ValueError, match="cannot allocate -1 bytes"):
        a.alloc(-1)
    assert a.statistics().used == 256 and a.statistics().allocations == 1


def test_freeing_the_reserved_block_is_refused() -> None:
    """Offset 0 means "null"; an app RELEASE-ing it must not corrupt the allocator."""
    a = BuddyAllocator(1 * KIB, name="recv")
    with pytest.raises(ValueError, match="recv: offset 0 is the reserved block"):
        a.free(0)
    assert a.statistics() == fresh_stats(1 * KIB)
    assert 0 not in [a.alloc(64) for _ in range(15)]


# ------------------------------------------------------------------ the thread-safe wrapper


def test_heap_wrapper() -> None:
    heap = Heap.private(8 * KIB, name="private")
    assert heap.size == 8 * KIB and len(heap.buf) == 8 * KIB
    off = heap.alloc(10)
    heap.buf[off : off + 10] = b"0123456789"
    assert heap.block_size(off) == 64
    heap.free(off)
    assert heap.statistics() == fresh_stats(8 * KIB)
    with pytest.raises(HeapExhausted):
        heap.alloc(8 * KIB)
    heap.closed = True
    heap.free(12345)  # a closed heap ignores frees (its memory is going away)


def test_heap_threads_never_share_a_block() -> None:
    heap = Heap.private(256 * KIB)
    owners: dict[int, int] = {}
    lock = threading.Lock()
    errors: list[str] = []
    start = threading.Barrier(4)

    def worker(tid: int) -> None:
        mine: list[int] = []  # at most 32 live blocks of <= 512 bytes: 4 threads fit in 64 KiB
        try:
            start.wait()
            for i in range(2000):
                if i % 4 == 0:
                    time.sleep(0)  # let the other threads in between our operations
                if len(mine) >= 32 or (mine and i % 3 == 0):
                    off = mine.pop(i % len(mine))
                    with lock:
                        del owners[off]
                    heap.free(off)
                    continue
                off = heap.alloc(64 + (i % 5) * 50)
                with lock:
                    if off in owners:
                        errors.append(f"offset {off} handed to threads {owners[off]} and {tid}")
                    owners[off] = tid
                mine.append(off)
            for off in mine:
                with lock:
                    del owners[off]
                heap.free(off)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    assert heap.statistics() == fresh_stats(256 * KIB)


# ------------------------------------------------------------------ state machine


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free sequences against a model of the live blocks."""

    SIZE = 16 * KIB

    def __init__(self) -> None:
        super().__init__()
        self.a = BuddyAllocator(self.SIZE)
        self.live: dict[int, tuple[int, int]] = {}  # off -> (requested, block size)

    @rule(n=st.one_of(st.integers(0, 300), st.integers(0, 9 * KIB)))
    def alloc(self, n: int) -> None:
        before = self.a.statistics()
        try:
            off = self.a.alloc(n)
        except HeapExhausted:
            after = self.a.statistics()
            assert after == before
            assert before.largest_free < max(n, 1)  # it really did not fit
            return
        block = self.a.block_size(off)
        assert block >= max(n, 1) and block < 2 * max(n, MIN_BLOCK)
        assert off not in self.live
        self.live[off] = (n, block)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        off = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[off]
        self.a.free(off)
        with pytest.raises(ValueError):
            self.a.free(off)

    @invariant()
    def no_overlap_and_exact_accounting(self) -> None:
        spans = sorted((off, off + block) for off, (_, block) in self.live.items())
        end = MIN_BLOCK  # the reserved block [0, MIN_BLOCK) is never handed out
        for start, stop in spans:
            assert start >= end, f"block at {start} overlaps one ending at {end}"
            assert start % (stop - start) == 0
            end = stop
        assert end <= self.SIZE
        stats = self.a.statistics()
        assert stats.used == sum(block for _, block in self.live.values())
        assert stats.allocations == len(self.live)

    def teardown(self) -> None:
        for off in list(self.live):
            self.a.free(off)
        assert self.a.statistics() == fresh_stats(self.SIZE)


AllocatorMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None
)
TestAllocatorMachine = AllocatorMachine.TestCase
