"""Call metadata (gRPC headers): the block encoding and the key rules.

How this works: an app writes a call's metadata as one block in its send heap
next to the request and flags the descriptor; the daemon copies the block out of
shared memory once, checks it (:func:`decode`, untrusted input) into an
immutable tuple of ``(key, value)`` pairs that policies read (``rpc.metadata``),
sends it to the peer daemon in a METADATA frame just before the CALL frame, and
the receiving daemon checks it again and lands it in the server app's receive
heap with the request.

The server's metadata travels back the same way with the reply or error: one
block holding its trailing metadata (``context.set_trailing_metadata``) and, when
the handler sent any (``context.send_initial_metadata``), its initial metadata.
A unary call has one response, so initial metadata rides with it instead of
arriving earlier; the caller reads both once the call completes.

Block layout (little-endian)::

    plain:     total u32 | count u16 | count x entry
    sectioned: total u32 | 0xFFFF u16 | n_initial u16 | n_trailing u16
               | n_initial x entry | n_trailing x entry
    entry:     klen u16 | vlen u32 | key bytes | value bytes

``total`` counts the bytes after itself. A call's metadata and a reply without
initial metadata are plain blocks (the format mrpc always used; a daemon
that predates initial metadata refuses only sectioned blocks, failing that one
call); only a reply whose handler sent initial metadata is sectioned (0xFFFF cannot be a plain count: a block holds at most
``MAX_ENTRIES``). A sectioned block decodes to :class:`ReplyMetadata`, which
iterates as the trailing pairs, so code that reads a reply's ``rpc.metadata``
sees what it always saw. ``max_metadata_size`` and ``MAX_ENTRIES`` bound the
whole block: initial and trailing metadata count together.

Key rules (gRPC): keys are non-empty and made of ``0-9 a-z _ . -`` (lowercase);
keys starting with ``grpc-`` are reserved; a key ending in ``-bin`` carries bytes,
any other key a printable-ASCII string. A break of these rules is
INVALID_ARGUMENT; a block larger than the limit is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from typing import Self

from libmrpc.status import StatusCode
from libmrpc.wire.errors import WireError

MAX_METADATA_SIZE = 8 * 1024  # bytes of one call's (or reply's) encoded metadata block
MAX_ENTRIES = 256  # entries of one block (a reply's initial and trailing together)
SECTIONED = 0xFFFF  # the count field of a sectioned block
_TOTAL = struct.Struct("<IH")
_SECTIONS = struct.Struct("<IHHH")
_ENTRY = struct.Struct("<HI")
_KEY = re.compile(rb"[0-9a-z_.\-]+")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")

Metadata = tuple[tuple[str, "str | bytes"], ...]


class MetadataError(WireError):
    """Metadata that breaks a rule; ``status`` is the gRPC code to answer with."""


class ReplyMetadata(tuple[tuple[str, "str | bytes"], ...]):
    """A reply's metadata when its handler sent initial metadata.

    It is the trailing ``(key, value)`` pairs (iterates, compares and
    indexes as them, like every reply's ``rpc.metadata``) and carries the initial
    pairs in ``initial``. It is true when either part holds an entry, so
    ``if rpc.metadata:`` forwards a reply that has initial metadata only.
    """

    initial: Metadata

    def __new__(
        cls, trailing: Iterable[tuple[str, str | bytes]], initial: Iterable[tuple[str, str | bytes]]
    ) -> Self:
        self = super().__new__(cls, trailing)
        self.initial = tuple(initial)
        return self

    def __bool__(self) -> bool:
        return bool(self.initial) or len(self) > 0

    def __getnewargs__(self) -> tuple[Metadata, Metadata]:
        return tuple(self), self.initial

    def __repr__(self) -> str:
        return f"ReplyMetadata(trailing={tuple(self)!r}, initial={self.initial!r})"


def split(metadata: Metadata) -> tuple[Metadata, Metadata]:
    """``(initial, trailing)`` of a reply's metadata, both plain tuples."""
    if isinstance(metadata, ReplyMetadata):
        return metadata.initial, tuple(metadata)
    return (), metadata


def encode(
    metadata: Iterable[tuple[str, str | bytes]],
    initial: Iterable[tuple[str, str | bytes]] = (),
) -> bytes:
    """The block for ``metadata`` pairs (types checked; key rules are the daemon's).

    ``initial`` (a reply's initial metadata; taken from ``metadata`` when that is
    a :class:`ReplyMetadata`) makes it a sectioned block when not empty; without
    it the block is plain. Raises MetadataError for a pair of the wrong types.
    """
    if isinstance(metadata, ReplyMetadata):
        initial = metadata.initial
    body, count = _entries(metadata)
    if not initial:
        return _TOTAL.pack(len(body) + 2, count) + body
    head, n_initial = _entries(initial)
    return _SECTIONS.pack(len(head) + len(body) + 6, SECTIONED, n_initial, count) + head + body


def _entries(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[bytes, int]:
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
    if count >= SECTIONED:
        raise MetadataError(
            f"{count} metadata entries (at most {MAX_ENTRIES})", StatusCode.RESOURCE_EXHAUSTED
        )
    return b"".join(parts), count


def block_size(buf: bytes | memoryview, off: int = 0) -> int:
    """Bytes of the block at ``off`` (its total field + 4); MetadataError if short."""
    if len(buf) - off < 4:
        raise MetadataError("metadata block is truncated")
    return int.from_bytes(buf[off : off + 4], "little") + 4


def decode(block: bytes, max_size: int = MAX_METADATA_SIZE) -> Metadata:
    """Check and decode one block (a private copy); raises MetadataError.

    A plain block gives a tuple of pairs; a sectioned one with initial entries a
    :class:`ReplyMetadata`. Errors in a section name it ("initial metadata: ...").
    """
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
    if count != SECTIONED:
        _check_count(count)
        pairs, pos = _read(block, _TOTAL.size, count)
        _check_end(block, pos)
        return pairs
    if len(block) < _SECTIONS.size:
        raise MetadataError("metadata block is truncated")
    _, _, n_initial, n_trailing = _SECTIONS.unpack_from(block)
    _check_count(n_initial + n_trailing)
    try:
        initial, pos = _read(block, _SECTIONS.size, n_initial)
    except MetadataError as e:
        raise MetadataError(f"initial metadata: {e}", e.status) from None
    try:
        trailing, pos = _read(block, pos, n_trailing)
    except MetadataError as e:
        raise MetadataError(f"trailing metadata: {e}", e.status) from None
    _check_end(block, pos)
    return ReplyMetadata(trailing, initial) if initial else trailing


def _check_count(count: int) -> None:
    if count > MAX_ENTRIES:
        raise MetadataError(
            f"{count} metadata entries exceed the limit of {MAX_ENTRIES}",
            StatusCode.RESOURCE_EXHAUSTED,
        )


def _check_end(block: bytes, pos: int) -> None:
    if pos != len(block):
        raise MetadataError(f"{len(block) - pos} stray bytes after the metadata entries")


def _read(block: bytes, pos: int, count: int) -> tuple[Metadata, int]:
    """``count`` checked entries from ``pos``, and the offset after them."""
    out: list[tuple[str, str | bytes]] = []
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
    return tuple(out), pos


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
