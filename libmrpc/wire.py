"""The daemon-to-daemon wire protocol: frame headers and a frame assembler.

Pure code over bytes (no sockets). A frame is a fixed 32-byte header followed
by ``body_len`` bytes:

    magic u16 'MR' | version u8 | type u8 | status u16 | flags u16
    | call_id u64 | method u32 | body_len u32 | aux u64

CALL bodies and REPLY bodies are message *images* (see docs/LAYOUT.md); ERROR
bodies are UTF-8 details; HELLO/HELLO_ACK bodies are JSON. For a CALL, ``aux``
is the remaining timeout in microseconds (0 = none).

:class:`FrameAssembler` turns a byte stream into frames. It asks its owner where
each body should land (``body_sink(header) -> memoryview | None``) as soon as the
header is complete, so a large body can be received straight into its final
place (an application's receive heap) without an intermediate copy; the owner's
I/O loop can ``recv_into(assembler.body_window())`` for that.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libmrpc.status import StatusCode, WireError

MAGIC = 0x524D  # b"MR" little-endian
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<HBBHHQIIQ")
HEADER_SIZE = HEADER.size  # 32

HELLO, HELLO_ACK, CALL, REPLY, ERROR, GOAWAY, PING, PONG = range(1, 9)
FRAME_NAMES = {HELLO: "HELLO", HELLO_ACK: "HELLO_ACK", CALL: "CALL", REPLY: "REPLY",
               ERROR: "ERROR", GOAWAY: "GOAWAY", PING: "PING", PONG: "PONG"}
MAX_CONTROL_BODY = 1 << 20  # HELLO / ERROR / GOAWAY bodies


@dataclass(frozen=True, slots=True)
class FrameHeader:
    type: int
    status: int
    flags: int
    call_id: int
    method: int
    body_len: int
    aux: int


def encode_header(ftype: int, *, call_id: int = 0, method: int = 0, body_len: int = 0,
                  status: int = 0, flags: int = 0, aux: int = 0) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, ftype, status, flags, call_id, method, body_len, aux)


def decode_header(buf: bytes | memoryview | bytearray, offset: int = 0, *,
                  max_body: int) -> FrameHeader:
    """Decode and check one header; raise WireError for anything malformed or short."""
    if len(buf) - offset < HEADER_SIZE:
        raise WireError(f"truncated frame header: {len(buf) - offset} of {HEADER_SIZE} bytes")
    magic, version, ftype, status, flags, call_id, method, body_len, aux = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise WireError(f"bad frame magic 0x{magic:04x} (expected 0x{MAGIC:04x}): not an mrpc peer")
    if version != PROTOCOL_VERSION:
        raise WireError(f"peer speaks protocol version {version}, this daemon speaks {PROTOCOL_VERSION}")
    if ftype not in FRAME_NAMES:
        raise WireError(f"unknown frame type {ftype}")
    if ftype in (CALL, REPLY):
        if body_len > max_body:
            raise WireError(f"{FRAME_NAMES[ftype]} body of {body_len} bytes exceeds the limit of {max_body}",
                            StatusCode.RESOURCE_EXHAUSTED)
    elif body_len > MAX_CONTROL_BODY:
        raise WireError(f"{FRAME_NAMES[ftype]} body of {body_len} bytes exceeds {MAX_CONTROL_BODY}")
    if status > 16:
        raise WireError(f"frame carries invalid status {status}")
    return FrameHeader(ftype, status, flags, call_id, method, body_len, aux)


def encode_error(call_id: int, status: int, details: str) -> list[bytes]:
    """An ERROR frame answering ``call_id`` (details cut to 16 KiB), as buffers to send."""
    body = details.encode()[:16384]
    return [encode_header(ERROR, call_id=call_id, status=int(status), body_len=len(body)), body]


def encode_json_frame(ftype: int, obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return encode_header(ftype, body_len=len(body)) + body


def decode_json_body(body: bytes | memoryview) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(body))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"control frame body is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise WireError("control frame body must be a JSON object")
    return obj


BodySink = Callable[[FrameHeader], memoryview | None]
"""Where a body lands: a writable view of exactly ``body_len`` bytes, or None
to have the assembler keep it in a private buffer (small bodies, control frames)."""


class FrameAssembler:
    """Byte stream in, ``(header, body)`` out. Never raises anything but WireError.

    ``feed(data)`` returns the frames completed by ``data`` — or, with
    ``on_frame``, hands each to it as soon as it completes (so the owner can act
    on a frame before the sink of the next one runs); ``body`` is the
    memoryview returned by the sink (or a private ``bytearray``). Partial frames
    are kept; feeding byte by byte gives the same frames as feeding whole.
    """

    def __init__(self, body_sink: BodySink | None = None, *, max_body: int = 256 << 20,
                 on_frame: Callable[[FrameHeader, memoryview], None] | None = None) -> None:
        self._sink = body_sink
        self._on_frame = on_frame
        self.max_body = max_body
        self._hdr = bytearray()
        self._header: FrameHeader | None = None
        self._body: memoryview | None = None
        self._filled = 0

    @property
    def in_body(self) -> bool:
        return self._header is not None

    def body_window(self) -> memoryview:
        """The unfilled rest of the current body (for a direct ``recv_into``)."""
        assert self._body is not None
        return self._body[self._filled:]

    def body_received(self, n: int) -> tuple[FrameHeader, memoryview] | None:
        """Account for ``n`` bytes received straight into ``body_window()``."""
        assert self._body is not None and self._header is not None
        self._filled += n
        if self._filled < len(self._body):
            return None
        return self._finish()

    def _finish(self) -> tuple[FrameHeader, memoryview]:
        assert self._header is not None and self._body is not None
        frame = (self._header, self._body)
        self._header, self._body, self._filled = None, None, 0
        return frame

    def _done(self, frames: list[tuple[FrameHeader, memoryview]]) -> None:
        frame = self._finish()
        if self._on_frame is not None:
            self._on_frame(*frame)  # before the next header's sink runs
        else:
            frames.append(frame)

    def _start(self, header: FrameHeader) -> None:
        dest = self._sink(header) if self._sink is not None else None
        if dest is None:
            dest = memoryview(bytearray(header.body_len))
        elif len(dest) != header.body_len:
            raise WireError(f"body sink gave {len(dest)} bytes for a {header.body_len}-byte body")
        self._header, self._body, self._filled = header, dest, 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[FrameHeader, memoryview]]:
        frames: list[tuple[FrameHeader, memoryview]] = []
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        pos, end = 0, len(view)
        while pos < end:
            if self._header is None:
                need = HEADER_SIZE - len(self._hdr)
                if not self._hdr and end - pos >= HEADER_SIZE:
                    header = decode_header(view, pos, max_body=self.max_body)
                    pos += HEADER_SIZE
                else:
                    take = min(need, end - pos)
                    self._hdr += view[pos:pos + take]
                    pos += take
                    if len(self._hdr) < HEADER_SIZE:
                        break
                    header = decode_header(self._hdr, max_body=self.max_body)
                    self._hdr.clear()
                self._start(header)
                if header.body_len == 0:
                    self._done(frames)
                continue
            assert self._body is not None
            take = min(len(self._body) - self._filled, end - pos)
            self._body[self._filled:self._filled + take] = view[pos:pos + take]
            self._filled += take
            pos += take
            if self._filled == len(self._body):
                self._done(frames)
        return frames
