"""The hot restart's codec: the hand-over channel and the receive heap's state."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time

import pytest

from libmrpc.wire.heap import BuddyAllocator
from mrpcd.handover import FDS_PER_CHUNK, HandoverError, check_peer, recv_doc, send_doc


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_a_document_and_more_fds_than_one_message_takes_arrive_in_order() -> None:
    a, b = _pair()
    pipes = [os.pipe() for _ in range(FDS_PER_CHUNK + 10)]  # two SCM_RIGHTS chunks
    try:
        doc = {"msg": "state", "apps": [{"pending": [(1, 2, 3)], "blob": b"\x00" * 70000}]}
        send_doc(a, doc, [w for _, w in pipes])
        got, fds = recv_doc(b, time.monotonic() + 5)
        assert got["msg"] == "state" and got["apps"] == doc["apps"] and got["version"] == 1
        assert len(fds) == len(pipes)
        for (r, _), fd in zip(pipes, fds, strict=True):  # each fd is the same pipe, in order
            os.write(fd, b"x%d" % r)
            assert os.read(r, 16) == b"x%d" % r
            os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        a.close()
        b.close()


def test_a_hang_up_a_timeout_and_a_foreign_version_are_errors() -> None:
    a, b = _pair()
    a.close()
    with pytest.raises(HandoverError, match="hung up"):
        recv_doc(b, time.monotonic() + 5)
    b.close()
    a, b = _pair()
    with pytest.raises(HandoverError, match="timed out"):
        recv_doc(b, time.monotonic() + 0.05)
    body = pickle.dumps({"msg": "state", "version": 99})
    a.sendall(struct.pack("!QI", len(body), 0) + body)
    with pytest.raises(HandoverError, match="version 99"):
        recv_doc(b, time.monotonic() + 5)
    a.close()
    b.close()


def test_the_peer_must_run_as_our_uid() -> None:
    a, b = _pair()
    check_peer(a, os.getpid())  # a socketpair: both ends are ours
    with pytest.raises(HandoverError, match="expected pid 1 "):
        check_peer(a, 1)
    a.close()
    b.close()


def test_a_heap_state_carries_over_allocations_and_free_blocks() -> None:
    old = BuddyAllocator(1 << 20, name="recv")
    offs = [old.alloc(n) for n in (100, 5000, 64, 70000, 300)]
    old.free(offs[1])
    state = old.export_state()
    state = pickle.loads(pickle.dumps(state))  # it crosses the process boundary as plain data
    new = BuddyAllocator(1 << 20, name="recv")
    new.import_state(state)
    assert new.statistics() == old.statistics()
    for off in (offs[0], offs[2], offs[3], offs[4]):
        assert new.is_allocated(off) and new.block_size(off) == old.block_size(off)
    assert not new.is_allocated(offs[1])
    assert [new.alloc(n) for n in (5000, 200)] == [old.alloc(n) for n in (5000, 200)]
    for off in (offs[0], offs[2], offs[3], offs[4]):
        new.free(off)  # the app releases what it held before the restart


def test_a_heap_state_of_another_size_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot import the state of a 2097152-byte heap"):
        BuddyAllocator(1 << 20).import_state(BuddyAllocator(2 << 20).export_state())
