"""Per-application shared memory: rings, send heap, receive heap, eventfds.

How this works: the daemon creates every region with ``memfd_create`` (never a
name in ``/dev/shm``), sizes it, maps it, seals it and passes the fds to the
application over the control socket (SCM_RIGHTS). Because the memory is only
reachable through fds and mappings, the kernel frees it when the last process
holding one exits — also after SIGKILL of the app, the daemon or both — so
nothing can leak.

Seals make the trust boundary real:
- every region: no shrink/grow (an app cannot truncate a region under the
  daemon and crash it with SIGBUS);
- the receive heap additionally gets F_SEAL_FUTURE_WRITE after the daemon has
  mapped it writable: the application can only ever map it read-only.

Regions (one set per application):
    ctl      submit ring (app -> daemon) then completion ring (daemon -> app)
    send     send heap: app allocates and writes, daemon reads
    recv     receive heap: daemon allocates and writes, app reads
and two eventfds: ``submit_efd`` (wakes the daemon), ``complete_efd`` (wakes the app).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass

from libmrpc.wire.ring import ring_bytes

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
_SEAL_SIZE = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


@dataclass(frozen=True)
class ShmLayout:
    ring_slots: int
    send_heap_size: int
    recv_heap_size: int

    @property
    def ring_size(self) -> int:
        return ring_bytes(self.ring_slots)

    @property
    def ctl_size(self) -> int:
        return 2 * self.ring_size

    def to_dict(self) -> dict[str, int]:
        return {
            "ring_slots": self.ring_slots,
            "send_heap_size": self.send_heap_size,
            "recv_heap_size": self.recv_heap_size,
        }


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _seal(fd: int, seals: int) -> None:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)


@dataclass
class DaemonRegions:
    """The daemon's side: fds to pass, and its own mappings."""

    layout: ShmLayout
    ctl_fd: int
    send_fd: int
    recv_fd: int
    submit_efd: int
    complete_efd: int
    ctl: mmap.mmap
    send: mmap.mmap  # read-only in the daemon
    recv: mmap.mmap  # read-write in the daemon

    def fds(self) -> list[int]:
        return [self.ctl_fd, self.send_fd, self.recv_fd, self.submit_efd, self.complete_efd]

    def close_fds(self) -> None:
        """Close the fds (the mappings stay valid); call once they were passed."""
        for fd in self.fds():
            try:
                os.close(fd)
            except OSError:
                pass
        self.ctl_fd = self.send_fd = self.recv_fd = -1


def create_regions(app_name: str, layout: ShmLayout) -> tuple[DaemonRegions, int, int]:
    """Create, map and seal one application's regions.

    Returns the regions plus the daemon's own eventfds ``(submit_efd,
    complete_efd)``; the fds in ``DaemonRegions.fds()`` are dup'd for passing.
    """
    fds: list[int] = []
    maps: list[mmap.mmap] = []
    try:
        tag = "".join(c if c.isalnum() else "_" for c in app_name)[:32]
        ctl_fd = _memfd(f"mrpc-ctl-{tag}", layout.ctl_size)
        fds.append(ctl_fd)
        send_fd = _memfd(f"mrpc-send-{tag}", layout.send_heap_size)
        fds.append(send_fd)
        recv_fd = _memfd(f"mrpc-recv-{tag}", layout.recv_heap_size)
        fds.append(recv_fd)
        ctl = mmap.mmap(ctl_fd, layout.ctl_size)
        maps.append(ctl)
        send = mmap.mmap(send_fd, layout.send_heap_size, prot=mmap.PROT_READ)
        maps.append(send)
        recv = mmap.mmap(recv_fd, layout.recv_heap_size)
        maps.append(recv)
        _seal(ctl_fd, _SEAL_SIZE | fcntl.F_SEAL_SEAL)
        _seal(send_fd, _SEAL_SIZE | fcntl.F_SEAL_SEAL)
        _seal(recv_fd, _SEAL_SIZE | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
        submit_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(submit_efd)
        complete_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(complete_efd)
    except BaseException:
        for m in maps:
            m.close()
        for fd in fds:
            os.close(fd)
        raise
    # The daemon keeps its own eventfd references; the passed set is dup'd.
    own_submit, own_complete = os.dup(submit_efd), os.dup(complete_efd)
    os.set_inheritable(own_submit, False)
    os.set_inheritable(own_complete, False)
    regions = DaemonRegions(
        layout, ctl_fd, send_fd, recv_fd, submit_efd, complete_efd, ctl, send, recv
    )
    return regions, own_submit, own_complete


@dataclass
class AppRegions:
    """The application's side of its regions."""

    layout: ShmLayout
    ctl: mmap.mmap
    send: mmap.mmap  # read-write
    recv: mmap.mmap  # read-only
    submit_efd: int
    complete_efd: int

    def close(self) -> None:
        for m in (self.ctl, self.send, self.recv):
            try:
                m.close()
            except BufferError:
                pass  # views still exported; the mapping goes when they do
        for fd in (self.submit_efd, self.complete_efd):
            try:
                os.close(fd)
            except OSError:
                pass


def map_app_regions(layout: ShmLayout, fds: list[int]) -> AppRegions:
    """Map the fds received at registration; the memfds are closed after mapping."""
    if len(fds) != 5:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected 5 fds from the daemon, got {len(fds)}")
    ctl_fd, send_fd, recv_fd, submit_efd, complete_efd = fds
    try:
        ctl = mmap.mmap(ctl_fd, layout.ctl_size)
        send = mmap.mmap(send_fd, layout.send_heap_size)
        recv = mmap.mmap(recv_fd, layout.recv_heap_size, prot=mmap.PROT_READ)
    finally:
        for fd in (ctl_fd, send_fd, recv_fd):
            os.close(fd)
    return AppRegions(layout, ctl, send, recv, submit_efd, complete_efd)


def notify(efd: int) -> None:
    try:
        os.eventfd_write(efd, 1)
    except BlockingIOError:
        pass  # counter saturated: the reader will wake anyway


def drain(efd: int) -> None:
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass
