"""The daemon-to-daemon wire protocol: frame headers and a frame assembler.

Pure code over bytes (no sockets). A frame is a fixed 32-byte header followed
by ``body_len`` bytes:

    magic u16 'MR' | version u8 | type u8 | status u16 | flags u16
    | call_id u64 | method u32 | body_len u32 | aux u64

CALL bodies and REPLY bodies are message *images* (see docs/LAYOUT.md); ERROR
bodies are UTF-8 details; HELLO/HELLO_ACK bodies are JSON. For a CALL, ``aux``
is the remaining timeout in microseconds (0 = none). A call with metadata is
preceded by a METADATA frame with the same call_id whose body is the metadata
block (libmrpc/wire/metadata.py); a call without metadata is exactly the CALL frame.
Likewise a METADATA frame before a REPLY / ERROR carries the server's metadata
(trailing, and initial when the handler sent any, as one block).
CANCEL (call_id = the CALL's, no body): the caller cancelled; its reply is unwanted.

Optional frames, sent only to a peer that advertised the matching feature in
its HELLO / HELLO_ACK (or a FEATURES frame), because a daemon that predates them
refuses an unknown frame type by closing the connection (see
engines/tcp_features.py): FEATURES (JSON body ``{"features": [...], "answer":
bool}``) re-announces what the sender understands on a live connection, after a
live upgrade of its transport; BATCH carries several whole frames (header and
body each) in its body, ``aux`` = how many, at most :data:`MAX_BATCH_BODY` bytes.
The header ``version`` stays 1: it is the framing, which never changed; what a
peer understands beyond it is negotiated by feature names.

:class:`FrameAssembler` turns a byte stream into frames. It asks its owner where
each body should land (``body_sink(header) -> memoryview | None``) as soon as the
header is complete, so a large body can be received straight into its final
place (an application's receive heap) without an intermediate copy; the owner's
I/O loop can ``recv_into(assembler.body_window())`` for that. A body the owner
does not accept (a call it refuses, a late reply) is skipped: the sink answers
:data:`DISCARD` and the assembler counts its bytes off without storing them, so
a peer announcing a huge body costs nothing it does not send. A body kept in
private memory grows as its bytes arrive, never allocated up front.

Every length is checked before a byte of the body is read: CALL/REPLY bodies
against the configured ``max_body``, HELLO/HELLO_ACK against
:data:`MAX_HELLO_BODY`, other control bodies against :data:`MAX_CONTROL_BODY`.
The magic, version and type are checked as soon as their bytes arrive, so a
stream that is not mrpc (an HTTP request) is refused after a few bytes.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libmrpc.status import StatusCode
from libmrpc.wire.errors import WireError

MAGIC = 0x524D  # b"MR" little-endian
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<HBBHHQIIQ")
HEADER_SIZE = HEADER.size  # 32

HELLO, HELLO_ACK, CALL, REPLY, ERROR, GOAWAY, PING, PONG, METADATA, CANCEL = range(1, 11)
FEATURES, BATCH = 11, 12  # optional: only to a peer that advertised them
FRAME_NAMES = {
    HELLO: "HELLO",
    HELLO_ACK: "HELLO_ACK",
    CALL: "CALL",
    REPLY: "REPLY",
    ERROR: "ERROR",
    GOAWAY: "GOAWAY",
    PING: "PING",
    PONG: "PONG",
    METADATA: "METADATA",
    CANCEL: "CANCEL",
    FEATURES: "FEATURES",
    BATCH: "BATCH",
}
MAX_CONTROL_BODY = 64 << 10  # ERROR / GOAWAY / PING / PONG bodies
MAX_HELLO_BODY = 64 << 10  # HELLO / HELLO_ACK bodies (JSON)
MAX_BATCH_BODY = 64 << 10  # BATCH bodies (the whole frames it carries)
MAX_HELLO_SERVICES = 256  # services one HELLO may list
MAX_SERVICE_NAME = 256  # characters in one service name
MAX_PEER_TIMEOUT_US = 7 * 24 * 3600 * 10**6  # a CALL's timeout (aux) is clamped to a week


@dataclass(frozen=True, slots=True)
class FrameHeader:
    type: int
    status: int
    flags: int
    call_id: int
    method: int
    body_len: int
    aux: int


def encode_header(
    ftype: int,
    *,
    call_id: int = 0,
    method: int = 0,
    body_len: int = 0,
    status: int = 0,
    flags: int = 0,
    aux: int = 0,
) -> bytes:
    return HEADER.pack(
        MAGIC, PROTOCOL_VERSION, ftype, status, flags, call_id, method, body_len, aux
    )


def decode_header(
    buf: bytes | memoryview | bytearray,
    offset: int = 0,
    *,
    max_body: int,
    oversize_ok: bool = False,
) -> FrameHeader:
    """Decode and check one header; raise WireError for anything malformed or short.

    With ``oversize_ok`` a CALL/REPLY body over ``max_body`` is let through: the
    caller must skip it (see :class:`FrameAssembler`) and fail that call alone."""
    if len(buf) - offset < HEADER_SIZE:
        raise WireError(f"truncated frame header: {len(buf) - offset} of {HEADER_SIZE} bytes")
    magic, version, ftype, status, flags, call_id, method, body_len, aux = HEADER.unpack_from(
        buf, offset
    )
    if magic != MAGIC:
        raise WireError(f"bad frame magic 0x{magic:04x} (expected 0x{MAGIC:04x}): not an mrpc peer")
    if version != PROTOCOL_VERSION:
        raise WireError(
            f"peer speaks protocol version {version}, this daemon speaks {PROTOCOL_VERSION}"
        )
    if ftype not in FRAME_NAMES:
        raise WireError(f"unknown frame type {ftype}")
    if ftype in (CALL, REPLY):
        if body_len > max_body and not oversize_ok:
            raise WireError(
                f"{FRAME_NAMES[ftype]} body of {body_len} bytes exceeds the limit of {max_body}",
                StatusCode.RESOURCE_EXHAUSTED,
            )
    elif ftype in (HELLO, HELLO_ACK):
        if body_len > MAX_HELLO_BODY:
            raise WireError(
                f"{FRAME_NAMES[ftype]} body of {body_len} bytes exceeds {MAX_HELLO_BODY}"
            )
    elif ftype == BATCH:
        if body_len > MAX_BATCH_BODY:
            raise WireError(f"BATCH body of {body_len} bytes exceeds {MAX_BATCH_BODY}")
    elif body_len > MAX_CONTROL_BODY:
        raise WireError(f"{FRAME_NAMES[ftype]} body of {body_len} bytes exceeds {MAX_CONTROL_BODY}")
    if status > 16:
        raise WireError(f"frame carries invalid status {status}")
    return FrameHeader(ftype, status, flags, call_id, method, body_len, aux)


def check_prefix(buf: bytes | bytearray | memoryview) -> None:
    """Check the first bytes of a header as soon as they arrive (magic, version,
    type); raise WireError on a stream that is not mrpc."""
    n = len(buf)
    if n >= 2 and buf[0] | buf[1] << 8 != MAGIC:
        raise WireError(f"bad frame magic {bytes(buf[:2])!r} (expected b'MR'): not an mrpc peer")
    if n >= 3 and buf[2] != PROTOCOL_VERSION:
        raise WireError(
            f"peer speaks protocol version {buf[2]}, this daemon speaks {PROTOCOL_VERSION}"
        )
    if n >= 4 and buf[3] not in FRAME_NAMES:
        raise WireError(f"unknown frame type {buf[3]}")


def clamp_timeout_us(aux: int) -> int:
    """A CALL's timeout from a peer, in microseconds, clamped to MAX_PEER_TIMEOUT_US (0 = none)."""
    return min(aux, MAX_PEER_TIMEOUT_US)


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
        raise WireError(
            f"control frame body is not JSON: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not isinstance(obj, dict):
        raise WireError("control frame body must be a JSON object")
    return obj


class Body(enum.Enum):
    DISCARD = "discard"


DISCARD = Body.DISCARD
"""A sink's answer meaning: skip this body (count its bytes off, keep none)."""
EMPTY = memoryview(b"")

BodySink = Callable[[FrameHeader], "memoryview | Body | None"]
"""Where a body lands: a writable view of exactly ``body_len`` bytes, None to
have the assembler keep it in a private buffer that grows as bytes arrive
(control frames, bodies a policy reads first), or DISCARD to skip it (the frame
is then delivered with an empty body)."""


class FrameAssembler:
    """Byte stream in, ``(header, body)`` out. Never raises anything but WireError.

    ``feed(data)`` returns the frames completed by ``data`` — or, with
    ``on_frame``, hands each to it as soon as it completes (so the owner can act
    on a frame before the sink of the next one runs); ``body`` is the
    memoryview returned by the sink (or a private buffer, or an empty view for a
    discarded body). Partial frames are kept; feeding byte by byte gives the
    same frames as feeding whole.
    """

    def __init__(
        self,
        body_sink: BodySink | None = None,
        *,
        max_body: int = 256 << 20,
        on_frame: Callable[[FrameHeader, memoryview], None] | None = None,
        skip_oversize: bool = False,
    ) -> None:
        self._sink = body_sink
        self._on_frame = on_frame
        self.max_body = max_body
        # a CALL/REPLY body over max_body goes to the sink, which must DISCARD it
        # (one call fails) -- else it is a malformed stream that ends the connection
        self.skip_oversize = skip_oversize and body_sink is not None
        self._hdr = bytearray()
        self._header: FrameHeader | None = None
        self._body: memoryview | None = None  # the sink's view (direct)
        self._private: bytearray | None = None  # a private body, grown as bytes arrive
        self._filled = 0

    @property
    def in_body(self) -> bool:
        return self._header is not None

    @property
    def partial(self) -> bool:
        """True while a frame (its header or body) is half received."""
        return self._header is not None or bool(self._hdr)

    @property
    def header_left(self) -> int:
        """Bytes still missing from the header being received (0 in a body)."""
        return HEADER_SIZE - len(self._hdr) if self._header is None else 0

    @property
    def body_received_so_far(self) -> int:
        return self._filled if self._header is not None else 0

    @property
    def body_left(self) -> int:
        return self._header.body_len - self._filled if self._header is not None else 0

    def body_window(self) -> memoryview | None:
        """The unfilled rest of the current body for a direct ``recv_into``, or
        None when the body is private or discarded (feed those through ``feed``)."""
        if self._body is None:
            return None
        return self._body[self._filled :]

    def body_received(self, n: int) -> tuple[FrameHeader, memoryview] | None:
        """Account for ``n`` bytes received straight into ``body_window()``."""
        assert self._body is not None and self._header is not None
        self._filled += n
        if self._filled < len(self._body):
            return None
        return self._finish()

    def reset(self) -> None:
        """Forget the partial frame and the owner's callbacks (on close: no cycles, no buffers)."""
        self._sink = None
        self._on_frame = None
        self._hdr = bytearray()
        self._header = self._body = self._private = None
        self._filled = 0

    def _finish(self) -> tuple[FrameHeader, memoryview]:
        assert self._header is not None
        if self._body is not None:
            body = self._body
        elif self._private is not None:
            body = memoryview(self._private)
        else:
            body = EMPTY
        frame = (self._header, body)
        self._header = self._body = self._private = None
        self._filled = 0
        return frame

    def _done(self, frames: list[tuple[FrameHeader, memoryview]]) -> None:
        frame = self._finish()
        if self._on_frame is not None:
            self._on_frame(*frame)  # before the next header's sink runs
        else:
            frames.append(frame)

    def _start(self, header: FrameHeader) -> None:
        dest = self._sink(header) if self._sink is not None else None
        self._header, self._body, self._private, self._filled = header, None, None, 0
        if dest is not DISCARD and header.body_len > self.max_body:
            raise WireError(
                f"{FRAME_NAMES[header.type]} body of {header.body_len} bytes exceeds the "
                f"limit of {self.max_body}",
                StatusCode.RESOURCE_EXHAUSTED,
            )
        if dest is None:
            self._private = bytearray()
        elif isinstance(dest, memoryview):
            if len(dest) != header.body_len:
                raise WireError(
                    f"body sink gave {len(dest)} bytes for a {header.body_len}-byte body"
                )
            self._body = dest
        # else DISCARD: neither

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[FrameHeader, memoryview]]:
        frames: list[tuple[FrameHeader, memoryview]] = []
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        pos, end = 0, len(view)
        while pos < end:
            header = self._header
            if header is None:
                need = HEADER_SIZE - len(self._hdr)
                if not self._hdr and end - pos >= HEADER_SIZE:
                    header = decode_header(
                        view, pos, max_body=self.max_body, oversize_ok=self.skip_oversize
                    )
                    pos += HEADER_SIZE
                else:
                    take = min(need, end - pos)
                    self._hdr += view[pos : pos + take]
                    pos += take
                    if len(self._hdr) < HEADER_SIZE:
                        check_prefix(self._hdr)
                        break
                    header = decode_header(
                        self._hdr, max_body=self.max_body, oversize_ok=self.skip_oversize
                    )
                    self._hdr.clear()
                self._start(header)
                if header.body_len == 0:
                    self._done(frames)
                continue
            take = min(header.body_len - self._filled, end - pos)
            if self._body is not None:
                self._body[self._filled : self._filled + take] = view[pos : pos + take]
            elif self._private is not None:
                self._private += view[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled == header.body_len:
                self._done(frames)
        return frames
