"""The metadata block codec and gRPC key rules (libmrpc/wire/metadata.py)."""

from __future__ import annotations

import pytest

from libmrpc.status import StatusCode
from libmrpc.wire import metadata as md


def test_round_trip_keeps_order_duplicates_and_binary() -> None:
    pairs = (("a", "1"), ("a", "2"), ("x-bin", b"\x00\xff"), ("k.y_z-w", ""))
    assert md.decode(md.encode(pairs)) == pairs


@pytest.mark.parametrize("key", ["A", "", "a b", "grpc-status", "é"])
def test_bad_keys_are_invalid_argument(key: str) -> None:
    with pytest.raises(md.MetadataError) as e:
        md.decode(md.encode([(key, "v")]))
    assert e.value.status is StatusCode.INVALID_ARGUMENT


def test_values_need_bin_keys_for_bytes_outside_printable_ascii() -> None:
    with pytest.raises(md.MetadataError, match="-bin"):
        md.decode(md.encode([("k", b"\x00")]))
    assert md.decode(md.encode([("k-bin", b"\x00")])) == (("k-bin", b"\x00"),)


def test_size_and_count_limits_are_resource_exhausted() -> None:
    with pytest.raises(md.MetadataError) as e:
        md.decode(md.encode([("k", "v" * 9000)]))
    assert e.value.status is StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(md.MetadataError) as e:
        md.decode(md.encode([("k", "")] * (md.MAX_ENTRIES + 1)))
    assert e.value.status is StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("cut", [1, 5, 9, 12])
def test_truncated_or_lying_blocks_are_refused(cut: int) -> None:
    block = md.encode([("key", "value")])
    with pytest.raises(md.MetadataError):
        md.decode(block[:-cut])
    lying = (len(block) + 10).to_bytes(4, "little") + block[4:]
    with pytest.raises(md.MetadataError):
        md.decode(lying)


def test_encode_type_errors() -> None:
    for bad in ([("k",)], [(1, "v")], [("k", 1)], [None]):
        with pytest.raises(md.MetadataError):
            md.encode(bad)  # type: ignore[arg-type]
