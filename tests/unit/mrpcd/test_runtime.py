"""Runtime: spinning adapts to CPU affinity; idle runtimes block."""

from __future__ import annotations

import os

import pytest

from mrpcd.runtime import effective_spin


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin down to one")
def test_no_busy_poll_when_pinned_to_one_cpu() -> None:
    before = os.sched_getaffinity(0)
    assert effective_spin(50) == 50e-6
    try:
        os.sched_setaffinity(0, {min(before)})
        assert effective_spin(50) == 0.0
    finally:
        os.sched_setaffinity(0, before)
    assert effective_spin(0) == 0.0
