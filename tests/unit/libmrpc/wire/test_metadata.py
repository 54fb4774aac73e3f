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


# A plain block as mrpc has always written it: 2 entries, ("a", "1") and ("k-bin", b"\x00").
OLD_BLOCK = bytes.fromhex("16000000 0200 0100 01000000 61 31 0500 01000000 6b2d62696e 00")
INITIAL = (("i", "v"), ("i-bin", b"\xff"))
TRAILING = (("t", "x"),)


def test_blocks_without_initial_metadata_stay_plain_and_old_blocks_decode() -> None:
    pairs = (("a", "1"), ("k-bin", b"\x00"))
    assert md.encode(pairs) == md.encode(pairs, ()) == OLD_BLOCK
    assert md.decode(OLD_BLOCK) == pairs and type(md.decode(OLD_BLOCK)) is tuple
    assert md.split(md.decode(OLD_BLOCK)) == ((), pairs)


def test_initial_metadata_round_trips_as_a_sectioned_block() -> None:
    block = md.encode(TRAILING, INITIAL)
    assert block[4:6] == b"\xff\xff" and len(block) == md.block_size(block)
    got = md.decode(block)
    assert isinstance(got, md.ReplyMetadata)
    assert got == TRAILING and got.initial == INITIAL  # reads as the trailing pairs
    assert md.split(got) == (INITIAL, TRAILING) and type(md.split(got)[1]) is tuple
    assert md.encode(got) == block  # a daemon forwards what it decoded unchanged
    only = md.decode(md.encode((), INITIAL))
    assert len(only) == 0 and bool(only) and only.initial == INITIAL  # true: it is forwarded
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(got)).initial == INITIAL == copy.copy(got).initial


def test_sectioned_blocks_are_checked_like_plain_ones() -> None:
    with pytest.raises(md.MetadataError, match="^initial metadata: .*reserved") as e:
        md.decode(md.encode(TRAILING, [("grpc-x", "v")]))
    assert e.value.status is StatusCode.INVALID_ARGUMENT
    with pytest.raises(md.MetadataError, match="^trailing metadata: .*invalid"):
        md.decode(md.encode([("T", "v")], INITIAL))
    # the size limit counts initial and trailing together; so does the entry limit
    half = [("k-bin", b"x" * 3000)]
    assert md.decode(md.encode(half)) and md.decode(md.encode((), half))
    with pytest.raises(md.MetadataError, match="exceeds the limit of 8192") as e:
        md.decode(md.encode(half * 2, half))
    assert e.value.status is StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(md.MetadataError) as e:
        md.decode(md.encode([("k", "")] * 200, [("k", "")] * 57))
    assert e.value.status is StatusCode.RESOURCE_EXHAUSTED


def test_a_sectioned_block_cut_anywhere_or_with_stray_bytes_is_refused() -> None:
    block = md.encode(TRAILING, INITIAL)
    for cut in range(len(block)):  # fed byte by byte: every prefix is refused
        with pytest.raises(md.MetadataError):
            md.decode(block[:cut])
    for cut in range(6, len(block)):  # and every shortened block that claims its length
        short = (cut - 4).to_bytes(4, "little") + block[4:cut]
        with pytest.raises(md.MetadataError):
            md.decode(short)
    stray = (len(block) + 1 - 4).to_bytes(4, "little") + block[4:] + b"\x00"
    with pytest.raises(md.MetadataError, match="stray"):
        md.decode(stray)


def test_garbage_is_a_metadata_error_and_nothing_else() -> None:
    import random

    rng = random.Random(8)
    seed = md.encode(TRAILING, INITIAL)
    for _ in range(3000):
        block = bytearray(seed)
        for _ in range(rng.randrange(1, 4)):
            block[rng.randrange(len(block))] = rng.randrange(256)
        try:
            md.decode(bytes(block))
        except md.MetadataError:
            pass
