"""SendQueue.privatize: unsent views of one frame are copied, others untouched."""

from __future__ import annotations

from engines.tcp_conn import SendQueue


def test_privatize_copies_only_the_unsent_views_of_the_range():
    shared = bytearray(b"A" * 100)
    other = bytearray(b"C" * 50)
    q = SendQueue()
    q.add([b"h1", memoryview(shared)[:60], memoryview(shared)[60:]])  # positions 0..102
    q.add([b"h2", memoryview(other)])  # positions 102..154
    q.sent = 1  # pretend one byte went out; iov[0] is what is left of it
    q.iov[0] = b"1"
    copied = q.privatize(0, 102)
    shared[:] = b"B" * 100  # the owner reuses its memory
    other[:] = b"D" * 50  # not privatized: still a view
    out = b"".join(bytes(b) for b in q.iov)
    assert copied == 100
    assert out == b"1" + b"A" * 100 + b"h2" + b"D" * 50
