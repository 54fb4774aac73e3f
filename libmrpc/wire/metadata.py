"""Call metadata (gRPC headers): the block encoding and the key rules.

How this works: an app writes a call's metadata as one block in its send heap
next to the request and flags the descriptor; the daemon copies the block out of
shared memory once, checks it (:func:`decode`, untrusted input) into an
immutable tuple of ``(key, value)`` pairs that policies read (``rpc.metadata``),
sends it to the peer daemon in a METADATA frame just before the CALL frame, and
the receiving daemon checks it again and lands it in the server app's receive
heap with the request.

Block layout (little-endian)::

    total u32 (bytes after this field) | count u16
    | count x (klen u16 | vlen u32 | key bytes | value bytes)

Key rules (gRPC): keys are non-empty and made of ``0-9 a-z _ . -`` (lowercase);
keys starting with ``grpc-`` are reserved; a key ending in ``-bin`` carries bytes,
any other key a printable-ASCII string. A break of these rules is
INVALID_ARGUMENT; a block larger than the limit is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

from libmrpc.status import StatusCode

MAX_METADATA_SIZE = 8 * 1024  # bytes of one call's encoded metadata block
MAX_ENTRIES = 256
_TOTAL = struct.Struct("<IH")
_ENTRY = struct.Struct("<HI")
_KEY = re.compile(rb"[0-9a-z_.\-]+")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")

Metadata = tuple[tuple[str, "str | bytes"], ...]


class MetadataError(Exception):
    """Metadata that breaks a rule; ``status`` is the gRPC code to answer with."""

    def __init__(self, message: str, status: StatusCode = StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.status = status


def encode(metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    """The block for ``metadata`` pairs (types checked; key rules are the daemon's)."""
    parts: list[bytes] = []
    count = 0
    for pair in metadata:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise MetadataError(f"metadata entry {pair!r} is not a (key, value) pair") from None
        if not isinstance(key, str):
            raise MetadataError(f"metadata key {key!r} is not a str")
        if isinstance(value, str):
            vb = value.encode("utf-8", "surrogateescape")
        elif isinstance(value, bytes | bytearray | memoryview):
            vb = bytes(value)
        else:
            raise MetadataError(
                f"metadata value for {key!r} is {type(value).__name__}; "
                f"use str (or bytes for a -bin key)"
            )
        kb = key.encode("utf-8", "surrogateescape")
        if len(kb) > 0xFFFF or len(vb) > 0xFFFFFFFF:
            raise MetadataError(
                f"metadata entry {key[:64]!r} is too large", StatusCode.RESOURCE_EXHAUSTED
            )
        parts += (_ENTRY.pack(len(kb), len(vb)), kb, vb)
        count += 1
    if count > 0xFFFF:
        raise MetadataError(
            f"{count} metadata entries (at most {MAX_ENTRIES})", StatusCode.RESOURCE_EXHAUSTED
        )
    body = b"".join(parts)
    return _TOTAL.pack(len(body) + 2, count) + body


def block_size(buf: bytes | memoryview, off: int = 0) -> int:
    """Bytes of the block at ``off`` (its total field + 4); MetadataError if short."""
    if len(buf) - off < 4:
        raise MetadataError("metadata block is truncated")
    return int.from_bytes(buf[off : off + 4], "little") + 4


def decode(block: bytes, max_size: int = MAX_METADATA_SIZE) -> Metadata:
    """Check and decode one block (a private copy); raises MetadataError."""
    if len(block) > max_size:
        raise MetadataError(
            f"metadata of {len(block)} bytes exceeds the limit of {max_size} "
            f"bytes; send less metadata",
            StatusCode.RESOURCE_EXHAUSTED,
        )
    if len(block) < _TOTAL.size:
        raise MetadataError("metadata block is truncated")
    total, count = _TOTAL.unpack_from(block)
    if total + 4 != len(block):
        raise MetadataError(f"metadata block says {total + 4} bytes but has {len(block)}")
    if count > MAX_ENTRIES:
        raise MetadataError(
            f"{count} metadata entries exceed the limit of {MAX_ENTRIES}",
            StatusCode.RESOURCE_EXHAUSTED,
        )
    out: list[tuple[str, str | bytes]] = []
    pos = _TOTAL.size
    for _ in range(count):
        if pos + _ENTRY.size > len(block):
            raise MetadataError("metadata block is truncated")
        klen, vlen = _ENTRY.unpack_from(block, pos)
        pos += _ENTRY.size
        if pos + klen + vlen > len(block):
            raise MetadataError("metadata block is truncated")
        kb, vb = block[pos : pos + klen], block[pos + klen : pos + klen + vlen]
        pos += klen + vlen
        out.append((check_key(kb), vb if kb.endswith(b"-bin") else check_value(kb, vb)))
    if pos != len(block):
        raise MetadataError(f"{len(block) - pos} stray bytes after the metadata entries")
    return tuple(out)


def check_key(kb: bytes) -> str:
    shown = kb[:64].decode("ascii", "backslashreplace")
    if not _KEY.fullmatch(kb):
        raise MetadataError(
            f"metadata key {shown!r} is invalid: keys are non-empty and use only "
            f"lowercase letters, digits, '-', '_' and '.'"
        )
    if kb.startswith(b"grpc-"):
        raise MetadataError(
            f"metadata key {shown!r} is reserved (the grpc- prefix belongs to "
            f"the RPC system); choose another key"
        )
    return kb.decode("ascii")


def check_value(kb: bytes, vb: bytes) -> str:
    if not _PRINTABLE.fullmatch(vb):
        raise MetadataError(
            f"metadata value of {kb[:64].decode('ascii')!r} is not printable "
            f"ASCII; binary values need a key ending in '-bin'"
        )
    return vb.decode("ascii")
