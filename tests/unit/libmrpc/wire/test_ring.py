"""SPSC rings: order, wrap-around, back-pressure, validation of the peer's counters,
and two sides on two different mappings of the same memfd."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from libmrpc._shm import AppRegions, DaemonRegions, ShmLayout, create_regions, map_app_regions
from libmrpc.wire.ring import (
    DESCRIPTOR,
    HEADER_SIZE,
    SLOT_SIZE,
    SUB_CALL,
    RingConsumer,
    RingCorrupted,
    RingProducer,
    ring_bytes,
)

ITEM = struct.Struct("<Q")
U64 = struct.Struct("<Q")
HEAD, TAIL, SLEEPING = 0, 64, 128


def make_ring(nslots: int) -> tuple[memoryview, RingProducer, RingConsumer]:
    buf = memoryview(bytearray(ring_bytes(nslots)))
    return (
        buf,
        RingProducer(buf, nslots, name="test ring"),
        RingConsumer(buf, nslots, name="test ring"),
    )


def pop_values(consumer: RingConsumer, limit: int = 256) -> list[int]:
    return [v for (v,) in consumer.pop_batch(ITEM, limit)]


# ------------------------------------------------------------------ sizing


def test_ring_bytes() -> None:
    assert ring_bytes(2) == HEADER_SIZE + 2 * SLOT_SIZE
    assert ring_bytes(1024) == HEADER_SIZE + 1024 * SLOT_SIZE
    for bad in (0, 1, 3, 6, 1000):
        with pytest.raises(ValueError, match=f"power of two >= 2, got {bad}"):
            ring_bytes(bad)


def test_region_too_small() -> None:
    buf = memoryview(bytearray(ring_bytes(8) - 1))
    with pytest.raises(ValueError, match="submit: region of .* too small for 8 slots"):
        RingProducer(buf, 8, name="submit")
    with pytest.raises(ValueError, match="too small"):
        RingConsumer(buf, 8)


# ------------------------------------------------------------------ order and wrap-around


def test_push_pop_order() -> None:
    _, prod, cons = make_ring(8)
    for i in range(5):
        assert prod.push(ITEM, 100 + i)
    assert cons.available() == 5
    assert pop_values(cons) == [100, 101, 102, 103, 104]
    assert cons.available() == 0
    assert prod.free_slots() == 8


def test_descriptor_round_trip() -> None:
    _, prod, cons = make_ring(4)
    desc = (SUB_CALL, 3, 14, 7, 2**64 - 1, 42, 9, 4096, 123456, 10**18)
    assert prod.push(DESCRIPTOR, *desc)
    assert cons.pop_batch(DESCRIPTOR) == [desc]


def test_wrap_around_many_times() -> None:
    """Counters run far past ``nslots * 3``; every slot index is reused many times."""
    nslots = 4
    buf, prod, cons = make_ring(nslots)
    sent: list[int] = []
    got: list[int] = []
    n = 0
    for rnd in range(60):
        for _ in range(rnd % nslots + 1):  # 1..nslots items per round
            assert prod.push(ITEM, n)
            sent.append(n)
            n += 1
        got.extend(pop_values(cons, limit=3))  # sometimes leaves items for the next round
    got.extend(pop_values(cons))
    assert got == sent
    assert prod.tail == cons.head == len(sent) > nslots * 30
    assert U64.unpack_from(buf, TAIL)[0] == U64.unpack_from(buf, HEAD)[0] == len(sent)


def test_full_ring_pushes_nothing_and_overwrites_nothing() -> None:
    buf, prod, cons = make_ring(4)
    for i in range(4):
        assert prod.push(ITEM, i)
    before = bytes(buf)
    assert prod.push(ITEM, 99) is False
    assert prod.push(ITEM, 100) is False
    assert bytes(buf) == before  # neither a slot nor the tail changed
    assert prod.tail == 4 and prod.free_slots() == 0
    assert pop_values(cons, limit=1) == [0]
    assert prod.push(ITEM, 4)  # one slot freed -> one push fits
    assert prod.push(ITEM, 5) is False
    assert pop_values(cons) == [1, 2, 3, 4]


def test_empty_ring_pops_nothing() -> None:
    buf, _, cons = make_ring(4)
    assert cons.pop_batch(ITEM) == []
    assert cons.available() == 0
    assert U64.unpack_from(buf, HEAD)[0] == 0


def test_batch_limit() -> None:
    _, prod, cons = make_ring(16)
    for i in range(10):
        prod.push(ITEM, i)
    assert pop_values(cons, limit=3) == [0, 1, 2]
    assert pop_values(cons, limit=0) == []
    assert cons.available() == 7
    assert pop_values(cons, limit=100) == [3, 4, 5, 6, 7, 8, 9]


def test_sides_resume_from_shared_counters() -> None:
    """A side built over an existing ring picks up the counters stored in it."""
    buf, prod, cons = make_ring(8)
    for i in range(6):
        prod.push(ITEM, i)
    pop_values(cons, limit=2)
    prod2, cons2 = RingProducer(buf, 8), RingConsumer(buf, 8)
    assert prod2.tail == 6 and cons2.head == 2
    assert prod2.push(ITEM, 6)
    assert pop_values(cons2) == [2, 3, 4, 5, 6]


# ------------------------------------------------------------------ sleeping flag


def test_sleeping_flag_round_trips() -> None:
    buf, prod, cons = make_ring(4)
    assert not prod.consumer_sleeping() and not cons.sleeping
    cons.set_sleeping(True)
    assert prod.consumer_sleeping() and prod.sleeping and cons.sleeping
    assert U64.unpack_from(buf, SLEEPING)[0] == 1  # a whole 8-byte word
    cons.set_sleeping(False)
    assert not prod.consumer_sleeping() and not cons.sleeping
    assert U64.unpack_from(buf, SLEEPING)[0] == 0


# ------------------------------------------------------------------ an untrusted peer


def test_consumer_rejects_tail_behind_head() -> None:
    buf, prod, cons = make_ring(4)
    for i in range(3):
        prod.push(ITEM, i)
    pop_values(cons)  # head = 3
    U64.pack_into(buf, TAIL, 1)
    with pytest.raises(RingCorrupted, match="test ring: tail 1 is inconsistent with head 3"):
        cons.available()
    with pytest.raises(RingCorrupted):
        cons.pop_batch(ITEM)
    assert cons.head == 3 and U64.unpack_from(buf, HEAD)[0] == 3  # nothing consumed


def test_consumer_rejects_tail_too_far_ahead() -> None:
    buf, _, cons = make_ring(4)
    U64.pack_into(buf, TAIL, 5)
    with pytest.raises(RingCorrupted, match="tail 5 is inconsistent with head 0"):
        cons.pop_batch(ITEM)
    U64.pack_into(buf, TAIL, 2**64 - 1)
    with pytest.raises(RingCorrupted):
        cons.available()
    U64.pack_into(buf, TAIL, 4)  # exactly full is legal
    assert cons.available() == 4


def test_producer_rejects_head_ahead_of_tail() -> None:
    buf, prod, _ = make_ring(4)
    prod.push(ITEM, 0)
    U64.pack_into(buf, HEAD, 2)
    with pytest.raises(RingCorrupted, match="test ring: head 2 is inconsistent with tail 1"):
        prod.free_slots()
    U64.pack_into(buf, HEAD, 2**64 - 1)
    with pytest.raises(RingCorrupted):
        prod.free_slots()


def test_producer_rejects_head_too_far_behind() -> None:
    buf, prod, cons = make_ring(4)
    for i in range(4):
        prod.push(ITEM, i)
    pop_values(cons)
    for i in range(4):
        prod.push(ITEM, i)  # tail = 8, head = 4: full
    U64.pack_into(buf, HEAD, 3)  # would mean 5 slots in use
    with pytest.raises(RingCorrupted, match="head 3 is inconsistent with tail 8"):
        prod.free_slots()
    with pytest.raises(RingCorrupted):
        prod.push(ITEM, 99)  # a push on a (seemingly) full ring re-reads head
    assert prod.tail == 8


# ------------------------------------------------------------------ two mappings of one memfd


@pytest.fixture
def mapped() -> Iterator[tuple[DaemonRegions, AppRegions]]:
    layout = ShmLayout(ring_slots=8, send_heap_size=1 << 16, recv_heap_size=1 << 16)
    regions, own_submit, own_complete = create_regions("ring test", layout)
    app = map_app_regions(layout, [os.dup(fd) for fd in regions.fds()])
    regions.close_fds()
    yield regions, app
    app.close()
    for m in (regions.ctl, regions.send, regions.recv):
        m.close()
    os.close(own_submit)
    os.close(own_complete)


def test_sides_on_two_mappings_see_each_other(mapped: tuple[DaemonRegions, AppRegions]) -> None:
    """The app submits on its mapping, the daemon consumes on its own (and back)."""
    regions, app = mapped
    size, slots = regions.layout.ring_size, regions.layout.ring_slots
    with memoryview(app.ctl) as app_ctl, memoryview(regions.ctl) as d_ctl:
        app_submit = RingProducer(app_ctl[:size], slots, name="submit")
        d_submit = RingConsumer(d_ctl[:size], slots, name="submit")
        d_complete = RingProducer(d_ctl[size : 2 * size], slots, name="complete")
        app_complete = RingConsumer(app_ctl[size : 2 * size], slots, name="complete")
        for rnd in range(5):  # wraps the 8-slot rings
            for i in range(6):
                assert app_submit.push(ITEM, rnd * 10 + i)
            got = pop_values(d_submit)
            assert got == [rnd * 10 + i for i in range(6)]
            for v in got:
                assert d_complete.push(ITEM, v + 1000)
            assert pop_values(app_complete) == [v + 1000 for v in got]
        app_complete.set_sleeping(True)
        assert d_complete.consumer_sleeping()
        d_submit.set_sleeping(True)
        assert app_submit.consumer_sleeping()
        assert app_submit.free_slots() == slots
        del app_submit, d_submit, d_complete, app_complete  # release the views


# ------------------------------------------------------------------ threads


def test_threaded_stress_every_item_once_in_order() -> None:
    """Two threads, 200k items through a 256-slot ring: nothing lost, duplicated or reordered."""
    total, nslots = 200_000, 256
    _, prod, cons = make_ring(nslots)
    received: list[int] = []
    errors: list[BaseException] = []
    deadline = time.monotonic() + 15

    def produce() -> None:
        try:
            i = 0
            while i < total and time.monotonic() < deadline:
                if prod.push(ITEM, i):
                    i += 1
                else:
                    time.sleep(0)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def consume() -> None:
        try:
            while len(received) < total and time.monotonic() < deadline:
                batch = cons.pop_batch(ITEM, limit=64)
                if batch:
                    received.extend(v for (v,) in batch)
                else:
                    time.sleep(0)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    assert len(received) == total
    assert received == list(range(total))
