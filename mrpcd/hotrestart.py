"""Hot restart, the old process's side: start the new mrpcd, quiesce, hand over, leave.

``mrpcctl daemon restart`` (operator op ``daemon_restart``) and SIGHUP call
:func:`hot_restart`:

1. The app control loop pauses with no operation running (registrations and
   binds wait in their sockets; calls go on). This process forks: the child
   (``_child``) drops every mrpc module (``mrpcd``, ``engines``, ``libmrpc``,
   ``policies``) and imports them again from disk, so it runs the code installed
   now (``mrpcd/takeover.py``), loads the config anew and binds every schema the
   apps use, while this process keeps serving. A fork, not an exec: the daemon's
   writable mapping of each app's receive heap cannot be made again (the heap is
   sealed ``F_SEAL_FUTURE_WRITE`` so apps can only read it), so the child keeps
   the mappings it inherited; it uses nothing else of the old code's objects
   and empties them before it opens anything (``mrpcd/oldworld.py``).
2. Quiesce: frontends take no new CALL from the submit rings (those stay posted,
   the new process takes them); the ingress reads every inbound connection up to
   a frame boundary and then stops (the rest waits in the kernel). What is half
   done finishes here (frames half read or written, calls between engines or
   held by a policy, completions waiting for ring room); calls that only wait
   for an answer (a peer's reply, a server app's) are carried over as data
   (``mrpcd/hotrestart_calls.py``) when the new process says it restores them
   (``loaded``: ``calls_versions``), else they finish here too. Then every
   runtime parks (a blocked ``Runtime.post``), and with all of them parked the
   daemon is checked to be settled (``hotrestart_state.settled``); if not, they
   run for a moment and it is checked again.
3. Hand over (``mrpcd/handover.py``): the lock, the listeners, every app's
   control socket and eventfds, every peer connection (SCM_RIGHTS), and as plain
   data the app records, receive-heap allocations, descriptors popped but not
   taken, calls waiting for an answer, routes and service owners
   (``mrpcd/hotrestart_state.py``).
4. The new process restores and says ``restored``; this one tells systemd
   ``MAINPID=``, says ``commit`` and exits without closing or unlinking anything
   (``Daemon.exit_handed_over``). If the new process fails, times out or dies
   first, this one resumes where it was (nothing was closed): rollback, and the
   error names the reason.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from libmrpc.status import RpcError, StatusCode
from mrpcd import hotrestart_operator
from mrpcd.handover import HandoverError, check_peer, recv_doc, send_doc
from mrpcd.hotrestart_calls import CALLS_VERSION
from mrpcd.hotrestart_state import collect_listeners, collect_state, settled

if TYPE_CHECKING:
    from mrpcd.daemon import Daemon
    from mrpcd.runtime import Runtime

log = logging.getLogger(__name__)
_one_at_a_time = threading.Lock()

#: ``mrpcd run`` options of this process (``config_path``, ``overrides``), set by
#: ``mrpcd.cli.run``: the new process loads the config with the same ones.
RUN_OPTIONS: dict[str, Any] = {}


class Inherited:
    """What a new daemon takes from the old one instead of opening it itself."""

    def __init__(
        self,
        lock_fd: int,
        listener: socket.socket,
        app_listener: socket.socket,
        op_listener: socket.socket,
    ) -> None:
        self.lock_fd = lock_fd
        self.listener = listener
        self.app_listener = app_listener
        self.op_listener = op_listener


class _Park:
    """Posted to a runtime: blocks its thread (no polling, no engine work) until released."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.parked = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.parked.set()
        self.release.wait()


def hot_restart(daemon: Daemon, timeout: float) -> dict[str, Any]:
    """One at a time: a second one asked for meanwhile (or once this process has
    handed over) fails with FAILED_PRECONDITION and changes nothing."""
    if daemon.handed_over:
        raise RpcError(
            StatusCode.FAILED_PRECONDITION,
            f"a hot restart just handed over to the new mrpcd (pid {daemon.successor_pid}); "
            f"this one exits: retry against the new one",
        )
    if not _one_at_a_time.acquire(blocking=False):
        raise RpcError(
            StatusCode.FAILED_PRECONDITION,
            "a hot restart is already under way; wait for it to finish (mrpcctl status shows "
            "the new pid) and retry if needed",
        )
    try:
        if daemon.draining:
            raise RpcError(StatusCode.FAILED_PRECONDITION, "mrpcd is shutting down; no restart")
        daemon.restarting = True
        try:
            return _restart(daemon, timeout)
        finally:
            daemon.restarting = False
    finally:
        _one_at_a_time.release()


def _fork(daemon: Daemon, ours: socket.socket, theirs: socket.socket) -> int:
    """Fork the new process (see the module doc); returns its pid."""
    options = dict(RUN_OPTIONS)
    notifier = daemon.notifier
    notify = (notifier.target, notifier.watchdog_usec) if notifier is not None else (None, 0)
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:  # the child: never returns into the old code
        ours.detach()  # not ours to close: a number the new code may reuse
        code = _child(daemon, theirs.detach(), options, notify)
    except BaseException:  # noqa: BLE001 - reported on stderr, then the child exits
        traceback.print_exc()
    finally:
        os._exit(code)


def _child(daemon: Daemon, fd: int, options: dict[str, Any], notify: tuple[Any, int]) -> int:
    old_world = (daemon, dict(sys.modules))  # emptied by the new code: mrpcd/oldworld.py
    inherited = {n for n in map(int, os.listdir("/proc/self/fd")) if _is_open(n)}  # not listdir's
    for name in list(sys.modules):
        if name.split(".")[0] in ("mrpcd", "engines", "libmrpc", "policies"):
            del sys.modules[name]
    importlib.invalidate_caches()
    takeover = importlib.import_module("mrpcd.takeover")
    return int(takeover.child_main(old_world, fd, inherited, options, notify))


def _restart(daemon: Daemon, timeout: float) -> dict[str, Any]:
    t_start = time.monotonic()
    deadline = t_start + timeout
    notifier = daemon.notifier
    if notifier is not None:
        notifier.reloading("hot restart: starting the new mrpcd")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    child: _Child | None = None
    quiesced: list[_Park] | None = None
    paused = told_systemd = False
    try:
        paused = True
        if not daemon.control.pause(timeout):
            raise HandoverError("timed out waiting for the apps' control operations to finish")
        t_pause = time.monotonic()
        child = _Child(_fork(daemon, ours, theirs))
        t_fork = time.monotonic()
        log.info(
            "hot restart: forked pid %d in %.1f ms (the control loop paused in %.1f ms)",
            child.pid,
            (t_fork - t_pause) * 1e3,
            (t_pause - t_start) * 1e3,
        )
        theirs.close()
        check_peer(ours, None)
        listeners, fds = collect_listeners(daemon)
        send_doc(ours, {"msg": "listeners", **listeners}, fds)
        loaded, _ = _expect(ours, deadline, "loaded", child)
        t_loaded = time.monotonic()
        # calls waiting for an answer move over, if the new code restores our format
        waiting = CALLS_VERSION in loaded.get("calls_versions", ())
        quiesced = []
        _quiesce(daemon, deadline, quiesced, waiting)
        t_quiet = time.monotonic()
        state, fds = collect_state(daemon, waiting)
        state["operator"] = hotrestart_operator.collect(daemon)
        send_doc(ours, {"msg": "state", **state}, fds)
        _expect(ours, deadline, "restored", child)
        if notifier is not None:
            told_systemd = notifier.mainpid(child.pid)
        send_doc(ours, {"msg": "commit"})
    except Exception as e:  # noqa: BLE001 - whatever failed, roll back and say why
        reason = _reason(e, child)
        if quiesced is not None:
            _resume(daemon, quiesced)
        if paused:
            daemon.control.resume()
        if child is not None:
            _reap(child)
        ours.close()
        if notifier is not None:
            if told_systemd:  # the commit did not go out: the main process is still this one
                notifier.mainpid(os.getpid())
            notifier.ready("hot restart failed; the old process serves on")
        log.error("hot restart failed, this mrpcd (pid %d) serves on: %s", os.getpid(), reason)
        code = StatusCode.DEADLINE_EXCEEDED if "timed out" in reason else StatusCode.UNAVAILABLE
        raise RpcError(code, f"hot restart failed, the old mrpcd serves on: {reason}") from None
    t_done = time.monotonic()
    daemon.successor_pid = child.pid
    daemon.handed_over = True  # committed: from here on the new process serves, whatever it says
    try:
        _expect(ours, time.monotonic() + 10.0, "serving", child)
    except HandoverError as e:
        log.error("hot restart: the new mrpcd (pid %d) did not confirm it serves: %s", child.pid, e)
    ours.close()
    result = {
        "old_pid": os.getpid(),
        "new_pid": child.pid,
        "startup_ms": round((t_loaded - t_start) * 1e3, 1),
        "settle_ms": round((t_quiet - t_loaded) * 1e3, 1),
        "stall_ms": round((t_done - t_loaded) * 1e3, 1),
        "apps": len(state["apps"]),
        "peer_connections": state["peer_connections"],
    }
    log.info(
        "hot restart: handed over to pid %d (new process ready in %.0f ms, calls paused "
        "%.1f ms of which settling %.1f ms); %d apps, %d peer connections",
        child.pid,
        result["startup_ms"],
        result["stall_ms"],
        result["settle_ms"],
        result["apps"],
        result["peer_connections"],
    )
    return result


def _expect(
    sock: socket.socket, deadline: float, what: str, child: _Child
) -> tuple[dict[str, Any], list[int]]:
    try:
        doc, fds = recv_doc(sock, deadline)
    except HandoverError as e:
        raise HandoverError(f"waiting for the new process to be {what}: {e}") from None
    for fd in fds:
        os.close(fd)
    if doc.get("msg") == "error":
        raise HandoverError(f"the new process (pid {child.pid}) failed: {doc.get('reason')}")
    if doc.get("msg") != what:
        raise HandoverError(f"the new process said {doc.get('msg')!r}, expected {what!r}")
    return doc, fds


def _quiesce(daemon: Daemon, deadline: float, parks: list[_Park], waiting: bool) -> None:
    """Stop everything at a settled point (see the module doc; with ``waiting`` calls
    that wait for an answer need not finish); on return every runtime is parked.
    Raises HandoverError when it does not settle by ``deadline``."""
    _set_quiesce(daemon, True)
    while True:
        parks[:] = [_Park(rt) for rt in daemon.runtimes]
        for park in parks:
            park.runtime.post(park)
        for park in parks:
            if not park.parked.wait(max(0.0, deadline - time.monotonic())):
                raise HandoverError(f"timed out waiting for runtime {park.runtime.name} to pause")
        if settled(daemon, waiting):
            return
        for park in parks:
            park.release.set()
        parks.clear()
        if time.monotonic() >= deadline:
            raise HandoverError(
                "timed out waiting for in-flight calls to settle (an app does not read its "
                "completions, or a policy holds calls)"
                if waiting
                else "timed out waiting for in-flight calls to finish (a peer or a server app "
                "does not answer, or an app does not read its completions; the new mrpcd "
                "cannot take over calls in flight)"
            )
        time.sleep(0.001)


def _set_quiesce(daemon: Daemon, on: bool) -> None:
    with daemon.apps_lock:
        apps = list(daemon.apps.values())
    for app in apps:
        dp = app.datapath
        if dp is not None and not app.closed:
            dp.frontend.quiesce = on  # type: ignore[attr-defined]
            app.waker()
    ingress = daemon.ingress
    if ingress is not None:
        daemon.runtimes[0].post(lambda: ingress.quiesce(on))  # type: ignore[attr-defined]


def _resume(daemon: Daemon, parks: list[_Park]) -> None:
    """Rollback: everything runs again as before the restart began."""
    _set_quiesce(daemon, False)
    for park in parks:
        park.release.set()


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


class _Child:
    """The forked new process, as the old one waits for and reaps it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    def poll(self, timeout: float = 0.0) -> int | None:
        end = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= end:
                break
            else:
                time.sleep(0.01)
        return self.status


def _reap(child: _Child) -> None:
    if child.poll() is None:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if child.poll(5.0) is None:
        log.error("the failed new mrpcd (pid %d) did not exit after SIGKILL", child.pid)


def _reason(e: Exception, child: _Child | None) -> str:
    text = str(e) or type(e).__name__
    if child is not None:
        code = child.poll(0.2)
        if code is not None and "failed:" not in text:
            text += f" (the new process pid {child.pid} exited with status {code}; see its log)"
    return text
