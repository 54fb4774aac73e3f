"""mrpcd/gcwatch.py: collections are timed; a newer generation's watch replaces an older one."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from mrpcd.gcwatch import GcWatch


@pytest.fixture
def watch() -> Iterator[GcWatch]:
    w = GcWatch()
    w.install()
    yield w
    w.uninstall()


def test_every_collection_is_counted_and_timed(watch: GcWatch) -> None:
    junk = [[i] for i in range(20000)]
    for x in junk:
        x.append(x)  # cycles: only the collector frees them
    del junk, x
    gc.collect()
    gc.collect(0)
    st = watch.stats()
    assert st["collections"][2] == 1 and st["collections"][0] >= 1
    assert 0 < st["longest_ms"][2] <= st["total_ms"][2]
    assert st["frozen_objects"] == gc.get_freeze_count()


def test_installing_a_new_watch_drops_the_older_ones_callback(watch: GcWatch) -> None:
    newer = GcWatch()
    newer.install()
    try:
        ours = [cb for cb in gc.callbacks if getattr(cb, "__module__", None) == "mrpcd.gcwatch"]
        assert ours == [newer._callback]
        gc.collect()
        assert newer.stats()["collections"][2] == 1 and watch.stats()["collections"][2] == 0
    finally:
        newer.uninstall()
