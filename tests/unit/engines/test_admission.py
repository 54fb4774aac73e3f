"""Admission helpers: deadline clamping, the marshal work limit, shared references by size."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.admission import MAX_TIMEOUT, U64_MAX, app_deadline, deadline_field
from libmrpc._heap import Heap
from libmrpc.loader import load_proto
from libmrpc.status import StatusCode
from libmrpc.wire import marshal as marshal_rt
from libmrpc.wire.errors import WireError

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
AT = load_proto(SCHEMAS / "alltypes.proto")
NAME = "alltypes.AllTypes"


@pytest.fixture
def work_limit() -> Iterator[None]:
    marshal_rt.set_work_limit(1024)
    try:
        yield
    finally:
        marshal_rt.set_work_limit(marshal_rt.DEFAULT_WORK)


def test_app_deadlines_are_clamped() -> None:
    now = 1000.0
    assert app_deadline(0, now) is None
    assert app_deadline(U64_MAX, now) is None  # centuries ahead: no deadline
    assert app_deadline(int((now + MAX_TIMEOUT + 10) * 1e9), now) is None
    assert app_deadline(int((now + 5) * 1e9), now) == pytest.approx(now + 5)
    past = app_deadline(1, now)
    assert past is not None and past <= now  # the caller fails it with DEADLINE_EXCEEDED


def test_deadline_fields_fit_u64() -> None:
    assert deadline_field(None) == 0
    assert deadline_field(float("inf")) == 0
    assert deadline_field(float("nan")) == 0
    assert deadline_field(1e30) == U64_MAX
    assert deadline_field(-5.0) == 1  # a past deadline stays a deadline
    assert deadline_field(2.5) == 2_500_000_000


def _shared_refs(heap: Heap, n: int, blob_len: int) -> int:
    """An AllTypes whose r_bytes holds ``n`` references to one blob; its offset."""
    msg = AT.AllTypes.new(heap, r_bytes=[b"x"])
    blob = heap.alloc(blob_len)
    arr = heap.alloc(8 * n)
    heap.buf[arr : arr + 8 * n] = struct.pack("<II", blob, blob_len) * n
    struct.pack_into("<II", heap.buf, msg._off + AT.AllTypes._SPECS["r_bytes"].off, arr, n)
    return msg._off


def test_more_elements_than_the_work_limit_fail_at_once(work_limit: None) -> None:
    heap = Heap.private(8 << 20)
    off = _shared_refs(heap, 100_000, 1)
    t0 = time.perf_counter()
    with pytest.raises(WireError) as e:
        AT.MARSHAL[NAME](heap.buf, off, 1 << 30, 1 << 30)
    assert time.perf_counter() - t0 < 0.05
    assert e.value.status is StatusCode.RESOURCE_EXHAUSTED and "limits.marshal_work" in str(e.value)
    ok = _shared_refs(heap, 500, 1)  # under the limit: fine
    head, segs = AT.MARSHAL[NAME](heap.buf, ok, 1 << 30, 1 << 30)
    AT.VALIDATE[NAME](bytes(head) + b"".join(bytes(s) for s in segs))


def test_validate_honours_the_work_limit(work_limit: None) -> None:
    heap = Heap.private(8 << 20)
    marshal_rt.set_work_limit(1 << 20)
    head, _ = AT.MARSHAL[NAME](heap.buf, _shared_refs(heap, 5000, 1), 1 << 30, 1 << 30)
    marshal_rt.set_work_limit(1024)
    with pytest.raises(WireError) as e:
        AT.VALIDATE[NAME](bytes(head))
    assert e.value.status is StatusCode.RESOURCE_EXHAUSTED and "limits.marshal_work" in str(e.value)


def test_shared_references_count_with_their_total_size() -> None:
    heap = Heap.private(8 << 20)
    off = _shared_refs(heap, 50_000, 1024)  # 50 MB counted, 1 KiB stored
    t0 = time.perf_counter()
    with pytest.raises(marshal_rt.TooBig) as e:
        AT.MARSHAL[NAME](heap.buf, off, 1 << 30, 4 << 20)
    assert time.perf_counter() - t0 < 0.05  # nothing was copied
    assert e.value.at_least >= 50_000 * 1024
    assert e.value.status is StatusCode.RESOURCE_EXHAUSTED


def test_set_work_limit_rejects_nonsense() -> None:
    for bad in (0, -1, 1.5, "10"):
        with pytest.raises(ValueError):
            marshal_rt.set_work_limit(bad)  # type: ignore[arg-type]
