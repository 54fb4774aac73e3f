"""Per-application shared memory: memfd regions, seals, and the read-only receive heap.

The fds travel over a real SEQPACKET socket pair, as at registration, so the app
side holds exactly what an application would."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from libmrpc._control import recv_msg, send_msg
from libmrpc._shm import (
    F_SEAL_FUTURE_WRITE,
    AppRegions,
    DaemonRegions,
    ShmLayout,
    create_regions,
    drain,
    map_app_regions,
    notify,
)
from libmrpc.wire.ring import ring_bytes

LAYOUT = ShmLayout(ring_slots=16, send_heap_size=64 * 1024, recv_heap_size=128 * 1024)
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclass
class Pair:
    daemon: DaemonRegions
    own_submit: int
    own_complete: int
    received: list[int]  # dups of the fds the app received, before map_app_regions closed them
    app: AppRegions


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[Pair]:
    regions, own_submit, own_complete = create_regions("my app/1", LAYOUT)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        send_msg(a, {"ok": True, "layout": LAYOUT.to_dict()}, regions.fds())
        regions.close_fds()
        msg, fds = recv_msg(b)
    assert msg is not None and ShmLayout(**msg["layout"]) == LAYOUT and len(fds) == 5
    received = [os.dup(fd) for fd in fds]
    app = map_app_regions(LAYOUT, fds)
    yield Pair(regions, own_submit, own_complete, received, app)
    app.close()
    for m in (regions.ctl, regions.send, regions.recv):
        m.close()
    for fd in (own_submit, own_complete, *received):
        os.close(fd)


def test_layout_sizes() -> None:
    assert LAYOUT.ring_size == ring_bytes(16)
    assert LAYOUT.ctl_size == 2 * ring_bytes(16)
    assert LAYOUT.to_dict() == {"ring_slots": 16, "send_heap_size": 65536, "recv_heap_size": 131072}


def test_regions_have_the_right_sizes(pair: Pair) -> None:
    ctl, send, recv, _, _ = pair.received
    assert os.fstat(ctl).st_size == len(pair.daemon.ctl) == len(pair.app.ctl) == LAYOUT.ctl_size
    assert os.fstat(send).st_size == len(pair.daemon.send) == len(pair.app.send) == 64 * 1024
    assert os.fstat(recv).st_size == len(pair.daemon.recv) == len(pair.app.recv) == 128 * 1024


def test_memfds_are_anonymous_and_tagged(pair: Pair) -> None:
    names = [os.readlink(f"/proc/self/fd/{fd}") for fd in pair.received[:3]]
    assert names == [f"/memfd:mrpc-{kind}-my_app_1 (deleted)" for kind in ("ctl", "send", "recv")]


def test_nothing_appears_in_dev_shm() -> None:
    before = set(os.listdir("/dev/shm"))
    regions, s, c = create_regions("dev shm check", LAYOUT)
    app = map_app_regions(LAYOUT, [os.dup(fd) for fd in regions.fds()])
    try:
        assert set(os.listdir("/dev/shm")) == before
    finally:
        app.close()
        regions.close_fds()
        for m in (regions.ctl, regions.send, regions.recv):
            m.close()
        os.close(s)
        os.close(c)
    assert set(os.listdir("/dev/shm")) == before


def test_seals(pair: Pair) -> None:
    ctl, send, recv, _, _ = pair.received
    assert fcntl.fcntl(ctl, fcntl.F_GET_SEALS) == SIZE_SEALS
    assert fcntl.fcntl(send, fcntl.F_GET_SEALS) == SIZE_SEALS
    assert fcntl.fcntl(recv, fcntl.F_GET_SEALS) == SIZE_SEALS | F_SEAL_FUTURE_WRITE
    with pytest.raises(PermissionError):  # F_SEAL_SEAL: the app cannot add or change seals
        fcntl.fcntl(send, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["ctl", "send", "recv"])
def test_ftruncate_on_passed_memfds_fails(pair: Pair, index: int) -> None:
    """An app cannot shrink a region under the daemon (SIGBUS) nor grow it."""
    fd = pair.received[index]
    size = os.fstat(fd).st_size
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, size // 2)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, size * 2)
    assert os.fstat(fd).st_size == size


def test_app_receive_heap_is_read_only(pair: Pair) -> None:
    with memoryview(pair.app.recv) as view:
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
        with pytest.raises(TypeError):
            view[10:13] = b"abc"
    with pytest.raises(TypeError):
        pair.app.recv[0:1] = b"x"


def test_receive_fd_cannot_be_mapped_writable(pair: Pair) -> None:
    """F_SEAL_FUTURE_WRITE: the received fd maps read-only only, and write(2) is refused."""
    recv = pair.received[2]
    with pytest.raises(PermissionError):
        mmap.mmap(recv, LAYOUT.recv_heap_size)
    with pytest.raises(PermissionError):
        mmap.mmap(recv, LAYOUT.recv_heap_size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with pytest.raises(PermissionError):
        os.pwrite(recv, b"x", 0)
    ro = mmap.mmap(recv, LAYOUT.recv_heap_size, prot=mmap.PROT_READ)
    ro.close()
    # the send heap and control region stay writable for the app
    for fd, size in (
        (pair.received[0], LAYOUT.ctl_size),
        (pair.received[1], LAYOUT.send_heap_size),
    ):
        mmap.mmap(fd, size).close()


def test_daemon_writes_to_receive_heap_are_visible_to_app(pair: Pair) -> None:
    payload = bytes(range(256)) * 8
    off = LAYOUT.recv_heap_size - len(payload)
    pair.daemon.recv[off : off + len(payload)] = payload
    assert pair.app.recv[off : off + len(payload)] == payload
    pair.daemon.recv[0:4] = b"\x01\x02\x03\x04"
    assert pair.app.recv[0:4] == b"\x01\x02\x03\x04"


def test_app_writes_to_send_heap_are_visible_to_daemon(pair: Pair) -> None:
    pair.app.send[100:105] = b"hello"
    assert pair.daemon.send[100:105] == b"hello"
    with memoryview(pair.daemon.send) as view:  # the daemon only reads the send heap
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1


def test_control_region_is_shared_both_ways(pair: Pair) -> None:
    pair.app.ctl[0:3] = b"app"
    end = LAYOUT.ctl_size
    pair.daemon.ctl[end - 6 : end] = b"daemon"
    assert pair.daemon.ctl[0:3] == b"app"
    assert pair.app.ctl[end - 6 : end] == b"daemon"


def test_eventfds_connect_app_and_daemon(pair: Pair) -> None:
    notify(pair.app.submit_efd)
    notify(pair.app.submit_efd)
    assert os.eventfd_read(pair.own_submit) == 2
    notify(pair.own_complete)
    assert os.eventfd_read(pair.app.complete_efd) == 1
    drain(pair.app.complete_efd)  # empty: no exception
    with pytest.raises(BlockingIOError):
        os.eventfd_read(pair.app.complete_efd)


def test_notify_on_a_saturated_eventfd_is_quiet(pair: Pair) -> None:
    os.eventfd_write(pair.own_complete, 0xFFFF_FFFF_FFFF_FFFE)
    notify(pair.own_complete)  # would overflow: EAGAIN, swallowed
    drain(pair.app.complete_efd)


def test_map_app_regions_closes_the_memfds(pair: Pair) -> None:
    before = open_fds()
    fds = [os.dup(fd) for fd in pair.received]
    app = map_app_regions(LAYOUT, fds)
    try:
        # the three memfds passed in are closed (CPython's mmap keeps a private dup of its
        # own); the two eventfds are kept by the app
        for fd in fds[:3]:
            with pytest.raises(OSError):
                os.fstat(fd)
        assert (app.submit_efd, app.complete_efd) == (fds[3], fds[4])
    finally:
        app.close()
    assert open_fds() == before  # and closing the regions leaves nothing behind


def test_map_app_regions_wrong_fd_count_closes_them() -> None:
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(3)]
    with pytest.raises(ValueError, match="expected 5 fds from the daemon, got 3"):
        map_app_regions(LAYOUT, fds)
    assert open_fds() == before


def test_daemon_mappings_outlive_close_fds() -> None:
    regions, s, c = create_regions("outlive", LAYOUT)
    regions.close_fds()
    assert regions.ctl_fd == regions.send_fd == regions.recv_fd == -1
    regions.recv[0:2] = b"ok"
    assert regions.recv[0:2] == b"ok"
    for m in (regions.ctl, regions.send, regions.recv):
        m.close()
    os.close(s)
    os.close(c)


def test_app_close_with_exported_views_does_not_raise(pair: Pair) -> None:
    view = memoryview(pair.app.recv)
    pair.app.close()  # the mapping stays until the view goes
    assert view[0] == 0
    view.release()
