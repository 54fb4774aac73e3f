"""Frame headers and the frame assembler: every decoder fed whole, byte at a time,
in random chunks and with trailing data; garbage in -> WireError, never anything else."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libmrpc.status import StatusCode
from libmrpc.wire.errors import WireError
from libmrpc.wire.frames import (
    CALL,
    DISCARD,
    ERROR,
    FRAME_NAMES,
    GOAWAY,
    HEADER,
    HEADER_SIZE,
    HELLO,
    HELLO_ACK,
    MAGIC,
    MAX_CONTROL_BODY,
    MAX_HELLO_BODY,
    PING,
    PONG,
    PROTOCOL_VERSION,
    REPLY,
    FrameAssembler,
    FrameHeader,
    clamp_timeout_us,
    decode_header,
    decode_json_body,
    encode_header,
    encode_json_frame,
)

Frame = tuple[FrameHeader, bytes]


def frame(ftype: int, body: bytes = b"", **kw: int) -> bytes:
    return encode_header(ftype, body_len=len(body), **kw) + body


def raw_header(
    *,
    magic: int = MAGIC,
    version: int = PROTOCOL_VERSION,
    ftype: int = CALL,
    status: int = 0,
    body_len: int = 0,
) -> bytes:
    return HEADER.pack(magic, version, ftype, status, 0, 1, 2, body_len, 3)


# A stream that covers every frame type, empty and non-empty bodies.
STREAM_FRAMES: list[bytes] = [
    encode_json_frame(HELLO, {"schema_hash": "abc", "services": ["kv.KV"], "app": "kv"}),
    encode_json_frame(HELLO_ACK, {"ok": True, "daemon": "d1"}),
    frame(CALL, bytes(range(200)), call_id=1, method=7, aux=5_000_000),
    frame(PING, call_id=2),
    frame(CALL, b"x" * 3, call_id=3, method=1),
    frame(REPLY, bytes(range(256)) * 3, call_id=1),
    frame(REPLY, b"", call_id=3),
    frame(ERROR, "no such method \u2603".encode(), call_id=4, status=int(StatusCode.UNIMPLEMENTED)),
    frame(PONG, call_id=2),
    frame(GOAWAY, b'{"reason":"upgrade"}'),
]
STREAM = b"".join(STREAM_FRAMES)


def collect(asm: FrameAssembler, chunks: Iterable[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out.extend((h, bytes(b)) for h, b in asm.feed(chunk))
    return out


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """Split ``data`` at the given chunk sizes (cycled); the last chunk takes the rest."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out


EXPECTED = collect(FrameAssembler(), [STREAM])


# ------------------------------------------------------------------ headers


def test_header_is_32_bytes() -> None:
    assert HEADER_SIZE == HEADER.size == 32
    assert encode_header(PING)[:2] == b"MR"


@pytest.mark.parametrize("ftype", sorted(FRAME_NAMES), ids=lambda t: FRAME_NAMES[t])
def test_header_round_trip_every_type(ftype: int) -> None:
    data = encode_header(
        ftype,
        call_id=2**64 - 1,
        method=2**32 - 1,
        body_len=1000,
        status=16,
        flags=0xFFFF,
        aux=2**63 + 5,
    )
    assert len(data) == HEADER_SIZE
    want = FrameHeader(ftype, 16, 0xFFFF, 2**64 - 1, 2**32 - 1, 1000, 2**63 + 5)
    assert decode_header(data, max_body=1000) == want
    # at an offset inside a larger buffer, with trailing data after it
    assert decode_header(b"junk" + data + b"trailing", 4, max_body=1000) == want


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (raw_header(magic=0x4547), "bad frame magic 0x4547 .*not an mrpc peer"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0\0", "bad frame magic"),
        (raw_header(version=2), "protocol version 2, this daemon speaks 1"),
        (raw_header(version=0), "protocol version 0"),
        (raw_header(ftype=0), "unknown frame type 0"),
        (raw_header(ftype=13), "unknown frame type 13"),
        (raw_header(ftype=255), "unknown frame type 255"),
        (raw_header(ftype=HELLO, body_len=MAX_HELLO_BODY + 1), "HELLO body of 65537 bytes exceeds"),
        (raw_header(ftype=ERROR, body_len=2**32 - 1), "ERROR body of"),
        (raw_header(ftype=PING, status=17), "invalid status 17"),
        (raw_header(ftype=REPLY, status=0xFFFF), "invalid status 65535"),
    ],
)
def test_decode_errors(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match) as info:
        decode_header(data, max_body=1 << 20)
    assert info.value.status is StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("ftype", [CALL, REPLY])
def test_oversized_message_body_is_resource_exhausted(ftype: int) -> None:
    data = raw_header(ftype=ftype, body_len=4097)
    with pytest.raises(
        WireError, match=f"{FRAME_NAMES[ftype]} body of 4097 bytes exceeds the limit of 4096"
    ) as info:
        decode_header(data, max_body=4096)
    assert info.value.status is StatusCode.RESOURCE_EXHAUSTED
    # exactly at the limit is fine; a message body is not bound by the control limit
    assert decode_header(raw_header(ftype=ftype, body_len=4096), max_body=4096).body_len == 4096
    big = MAX_CONTROL_BODY * 4
    assert decode_header(raw_header(ftype=ftype, body_len=big), max_body=big).body_len == big


def test_control_body_limit_is_inclusive() -> None:
    hdr = decode_header(raw_header(ftype=GOAWAY, body_len=MAX_CONTROL_BODY), max_body=0)
    assert hdr.body_len == MAX_CONTROL_BODY


def test_decode_header_on_truncated_buffer_is_a_wire_error() -> None:
    """Fed byte at a time, the public header decoder must not leak ``struct.error``."""
    data = encode_header(PING)
    for n in range(HEADER_SIZE):
        with pytest.raises(WireError, match=f"truncated frame header: {n} of 32 bytes"):
            decode_header(data[:n], max_body=0)
    with pytest.raises(WireError, match="truncated frame header: 31 of 32 bytes"):
        decode_header(b"xx" + data[:31], 2, max_body=0)


# ------------------------------------------------------------------ JSON control frames


def test_json_frame_round_trip() -> None:
    obj = {"ok": False, "code": 5, "error": "schema \u00e9 mismatch", "list": [1, 2, {"a": None}]}
    data = encode_json_frame(HELLO_ACK, obj)
    ((hdr, body),) = FrameAssembler().feed(data)
    assert hdr.type == HELLO_ACK and hdr.body_len == len(data) - HEADER_SIZE
    assert decode_json_body(body) == obj


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff\xfe\xfd", "not JSON"),
        (b'{"a": 1} trailing', "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"hello"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
def test_json_body_errors(body: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_json_body(body)
    with pytest.raises(WireError):
        decode_json_body(memoryview(body))


def test_deeply_nested_json_body_is_a_wire_error() -> None:
    """A 1 MiB HELLO body is allowed, so a peer can nest that deep."""
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 50_000 + b"]" * 50_000):
        with pytest.raises(WireError, match="not JSON"):
            decode_json_body(body)


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_json_body_garbage_is_only_wire_error(body: bytes) -> None:
    try:
        assert isinstance(decode_json_body(body), dict)
    except WireError:
        pass


# ------------------------------------------------------------------ assembler: whole / bytes / chunks


def test_stream_fed_whole() -> None:
    assert len(EXPECTED) == len(STREAM_FRAMES)
    assert [h.type for h, _ in EXPECTED] == [
        HELLO,
        HELLO_ACK,
        CALL,
        PING,
        CALL,
        REPLY,
        REPLY,
        ERROR,
        PONG,
        GOAWAY,
    ]
    assert EXPECTED[2][0] == FrameHeader(CALL, 0, 0, 1, 7, 200, 5_000_000)
    assert EXPECTED[2][1] == bytes(range(200))
    assert EXPECTED[7][1].decode() == "no such method \u2603"
    assert EXPECTED[7][0].status == StatusCode.UNIMPLEMENTED
    assert decode_json_body(EXPECTED[0][1])["services"] == ["kv.KV"]


def test_stream_fed_byte_at_a_time() -> None:
    asm = FrameAssembler()
    got = collect(asm, (STREAM[i : i + 1] for i in range(len(STREAM))))
    assert got == EXPECTED
    assert not asm.in_body


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_bytes_like(kind: type) -> None:
    asm = FrameAssembler()
    got = collect(asm, [kind(c) for c in chunked(STREAM, [7, 50, 1])])  # type: ignore[call-arg]
    assert got == EXPECTED


def test_trailing_partial_data_is_kept() -> None:
    """Whole frames come out at once; a partial header or body waits for its rest."""
    extra = frame(CALL, b"tail body", call_id=99)
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 4):
        asm = FrameAssembler()
        assert collect(asm, [STREAM + extra[:cut]]) == EXPECTED
        assert asm.in_body is (cut >= HEADER_SIZE)
        ((hdr, body),) = collect(asm, [extra[cut:]])
        assert hdr.call_id == 99 and body == b"tail body"
        assert not asm.in_body


def test_empty_feed_is_harmless() -> None:
    asm = FrameAssembler()
    assert asm.feed(b"") == []
    assert collect(asm, [STREAM[:10], b"", STREAM[10:], b""]) == EXPECTED


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), min_size=1, max_size=40))
def test_stream_fed_in_random_chunks(sizes: list[int]) -> None:
    assert collect(FrameAssembler(), chunked(STREAM, sizes)) == EXPECTED


# ------------------------------------------------------------------ body sinks and direct receives


class HeapSink:
    """Lands every CALL/REPLY body in one 'heap' bytearray, one after the other."""

    def __init__(self, size: int = 8192) -> None:
        self.heap = bytearray(size)
        self.view = memoryview(self.heap)
        self.next = 0
        self.placed: dict[int, tuple[int, int]] = {}  # call_id -> (offset, length)
        self.events: list[tuple[str, int, int]] = []

    def __call__(self, header: FrameHeader) -> memoryview | None:
        self.events.append(("sink", header.type, header.call_id))
        if header.type not in (CALL, REPLY):
            return None
        off = self.next
        self.next += header.body_len
        self.placed[header.call_id] = (off, header.body_len)
        return self.view[off : off + header.body_len]


@pytest.mark.parametrize("step", [len(STREAM), 1, 13])
def test_body_sink_lands_bodies_in_place(step: int) -> None:
    sink = HeapSink()
    asm = FrameAssembler(sink)
    got = collect(asm, chunked(STREAM, [step]))
    assert got == EXPECTED
    messages = [f for f in STREAM_FRAMES if f[3] in (CALL, REPLY)]
    assert len(sink.placed) == 2  # call ids 1 and 3, each used by a CALL then a REPLY
    off, n = sink.placed[1]  # the REPLY for call 1 was placed last
    assert bytes(sink.heap[off : off + n]) == bytes(range(256)) * 3
    assert sink.next == sum(len(f) - HEADER_SIZE for f in messages)
    assert bytes(sink.heap[:200]) == bytes(range(200))  # the first CALL, never moved


def test_body_returned_is_the_sinks_memory() -> None:
    sink = HeapSink()
    ((_, body),) = FrameAssembler(sink).feed(frame(CALL, b"abc", call_id=5))
    assert body.obj is sink.heap
    body_bytes = bytes(body)
    sink.heap[0:3] = b"XYZ"
    assert bytes(body) == b"XYZ" != body_bytes  # a view, not a copy


def test_direct_receive_via_body_window() -> None:
    """The owner's recv_into(body_window()) path: bytes go straight into the sink."""
    sink = HeapSink()
    asm = FrameAssembler(sink)
    payload = bytes(range(251)) * 4
    data = frame(CALL, payload, call_id=8) + frame(PING, call_id=9)
    assert asm.feed(data[: HEADER_SIZE + 10]) == []
    assert asm.in_body
    pos = HEADER_SIZE + 10
    body_end = HEADER_SIZE + len(payload)
    result = None
    while pos < body_end:
        window = asm.body_window()
        assert len(window) == body_end - pos
        n = min(100, len(window))
        window[:n] = data[pos : pos + n]  # what sock.recv_into(window) does
        pos += n
        result = asm.body_received(n)
        assert (result is None) is (pos < body_end)
    assert result is not None
    hdr, body = result
    assert hdr.call_id == 8 and bytes(body) == payload
    assert bytes(sink.heap[: len(payload)]) == payload
    assert not asm.in_body
    ((ping, _),) = asm.feed(data[pos:])  # and the stream carries on
    assert ping.type == PING and ping.call_id == 9


@pytest.mark.parametrize("delta", [-1, 1])
def test_sink_of_the_wrong_length_is_a_wire_error(delta: int) -> None:
    asm = FrameAssembler(lambda h: memoryview(bytearray(h.body_len + delta)))
    with pytest.raises(WireError, match=f"body sink gave {10 + delta} bytes for a 10-byte body"):
        asm.feed(frame(CALL, b"0123456789"))


def test_on_frame_runs_before_the_next_sink() -> None:
    """The owner acts on each frame before it is asked where the next body goes."""
    sink = HeapSink()
    asm = FrameAssembler(
        sink, on_frame=lambda h, b: sink.events.append(("frame", h.type, h.call_id))
    )
    assert asm.feed(STREAM) == []  # frames went to on_frame, not to the return value
    want: list[tuple[str, int, int]] = []
    for h, _ in EXPECTED:
        want += [("sink", h.type, h.call_id), ("frame", h.type, h.call_id)]
    assert sink.events == want


def test_on_frame_sees_bodies_byte_at_a_time() -> None:
    seen: list[Frame] = []
    asm = FrameAssembler(on_frame=lambda h, b: seen.append((h, bytes(b))))
    for i in range(len(STREAM)):
        assert asm.feed(STREAM[i : i + 1]) == []
    assert seen == EXPECTED


def test_assembler_errors_whole_and_byte_at_a_time() -> None:
    bad = STREAM_FRAMES[0] + raw_header(ftype=42) + STREAM_FRAMES[1]
    with pytest.raises(WireError, match="unknown frame type 42"):
        FrameAssembler().feed(bad)
    asm = FrameAssembler()
    frames: list[Frame] = []
    with pytest.raises(WireError, match="unknown frame type 42"):
        for i in range(len(bad)):
            frames += [(h, bytes(b)) for h, b in asm.feed(bad[i : i + 1])]
    assert frames == EXPECTED[:1]  # the good frame before the bad one came out


def test_assembler_max_body() -> None:
    asm = FrameAssembler(max_body=100)
    with pytest.raises(WireError) as info:
        asm.feed(raw_header(ftype=REPLY, body_len=101))
    assert info.value.status is StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------ declined bodies cost nothing


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_discarded_body_is_skipped_without_storing(step: int) -> None:
    """A declined body is counted off; the frame comes out with an empty body and
    the stream carries on. Nothing of the announced size is ever allocated."""
    seen: list[Frame] = []
    asm = FrameAssembler(
        lambda h: DISCARD if h.type == CALL else None,
        on_frame=lambda h, b: seen.append((h, bytes(b))),
    )
    data = frame(CALL, b"x" * 10_000, call_id=1) + frame(PING, call_id=2)
    for chunk in chunked(data, [step]):
        asm.feed(chunk)
        assert asm.body_window() is None or not asm.in_body
        assert asm._private is None or len(asm._private) == 0
    assert [(h.type, h.call_id, b) for h, b in seen] == [(CALL, 1, b""), (PING, 2, b"")]


def test_huge_announced_private_body_grows_only_with_the_bytes_sent() -> None:
    asm = FrameAssembler(max_body=1 << 30)
    asm.feed(raw_header(ftype=CALL, body_len=(1 << 30) - 1) + b"abc")
    assert asm.in_body and asm.body_left == (1 << 30) - 4
    assert asm._private is not None and len(asm._private) == 3  # not a GiB of zeroes
    asm.reset()
    assert not asm.partial


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n", b"MR\x07", b"MR\x01\x63"])
def test_a_stream_that_is_not_mrpc_is_refused_within_four_bytes(junk: bytes) -> None:
    asm = FrameAssembler()
    with pytest.raises(WireError):
        for i in range(len(junk)):
            asm.feed(junk[i : i + 1])
            assert i < 4


def test_peer_timeouts_are_clamped() -> None:
    assert clamp_timeout_us(2**64 - 1) == 7 * 24 * 3600 * 10**6
    assert clamp_timeout_us(5) == 5 and clamp_timeout_us(0) == 0


# ------------------------------------------------------------------ fuzz


def _mutations() -> st.SearchStrategy[bytes]:
    """Bytes that get past the magic check often enough to reach the deeper checks."""
    header = st.builds(
        lambda v, t, s, n, f: struct.pack("<HBBHHQIIQ", MAGIC, v, t, s, f, 1, 2, n, 3),
        st.sampled_from([0, 1, 1, 1, 2]),
        st.integers(0, 10),
        st.integers(0, 20),
        st.integers(0, 300),
        st.integers(0, 0xFFFF),
    )
    return st.lists(
        st.one_of(header, st.binary(max_size=64), st.sampled_from(STREAM_FRAMES)), max_size=8
    ).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.binary(max_size=400), _mutations()),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=10),
    st.booleans(),
)
def test_garbage_gives_frames_or_wire_error_only(data: bytes, sizes: list[int], sink: bool) -> None:
    """Invariant: garbage in -> frames or WireError, never any other exception."""
    asm = FrameAssembler(HeapSink(1 << 16) if sink else None, max_body=256)
    try:
        for chunk in chunked(data, sizes):
            for hdr, body in asm.feed(chunk):
                assert len(body) == hdr.body_len
                assert hdr.type in FRAME_NAMES and hdr.status <= 16
    except WireError as e:
        assert isinstance(e.status, StatusCode)
