"""One event loop thread serves every application control socket.

The loop (``ControlLoop``) waits with epoll on the app listener, on every app
control socket and on a wake-up socket. It reads one SEQPACKET message per
readable event and answers quick operations at once. Operations that may take
long (``register`` waits for a runtime, ``bind_schema`` may compile in a child
process) run on a small fixed pool of worker threads; meanwhile the loop stops
reading that socket, so a connection has at most one operation in flight and its
replies keep their order. End of stream (the app exited or hung up, or the
daemon shut the socket down because the app broke its datapath) closes the
socket and cleans the app up on the pool.

Replies are small: a reply that would block means the app does not read its
control socket, and the connection is closed. A connection that does not
register within ``apps.register_timeout`` is closed by a timer. Out of file
descriptors, a spare descriptor is released to accept the waiting connection,
tell it RESOURCE_EXHAUSTED and close it (see ``mrpcd.accept``).

Threads and descriptors no longer grow with the number of apps: the loop, the
workers, and per app its socket plus what its datapath holds.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from libmrpc._control import error_reply, peer_credentials, peer_groups, recv_msg, send_msg
from libmrpc.status import StatusCode
from mrpcd.accept import BACKOFF, OUT_OF_FDS, RateLimitedLog, refuse_connection, spare_fd

log = logging.getLogger(__name__)
# Operations run on workers. Binds (a compile can take seconds) have their own
# workers, so binding apps cannot hold up registrations and cleanups.
SLOW_OPS = frozenset({"register", "bind_schema"})
COMPILE_OPS = frozenset({"bind_schema"})
ACCEPT_BATCH = 64  # connections accepted per readable event before serving others


@dataclass(eq=False)
class AppConn:
    """One app control connection, as the loop sees it."""

    sock: socket.socket
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    deadline: float  # monotonic time by which it must have registered
    app: Any = None  # the AppState once registered
    busy: bool = False  # an operation runs on the pool; the socket is not read meanwhile
    closed: bool = False
    fd: int = field(default=-1)


# The daemon's side: handle(conn, msg) -> reply to send, or None when the handler
# sent it (register sends its fds itself); raises OSError when the connection broke.
Handler = Callable[[AppConn, dict[str, Any]], "dict[str, Any] | None"]
Gone = Callable[[AppConn, str], None]


class ControlLoop:
    """Serve ``listener``'s connections with ``handle``; ``gone`` cleans up a closed one."""

    def __init__(
        self,
        listener: socket.socket,
        handle: Handler,
        gone: Gone,
        register_timeout: float,
        workers: int = 2,
        compile_workers: int = 2,
    ) -> None:
        self.listener = listener
        self.handle = handle
        self.gone = gone
        self.register_timeout = register_timeout
        self.conns: dict[int, AppConn] = {}  # fd -> connection
        self._timers: list[
            tuple[float, int, AppConn]
        ] = []  # (deadline, seq, conn) of unregistered conns
        self._seq = itertools.count()
        self._done: queue.SimpleQueue[tuple[AppConn, str | None]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._compile_jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._listener_paused_until = 0.0
        self._complain = RateLimitedLog()
        self._spare: int | None = None
        # hot restart: pause() stops the loop with no operation running; adopt() takes
        # over an old daemon's connections before start()
        self._pause_asked = threading.Event()
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._active = 0  # jobs running on the workers
        self._active_lock = threading.Lock()
        self._adopted: list[AppConn] = []
        self._threads = [
            threading.Thread(
                target=self._work, args=(self._jobs,), name=f"mrpcd-ctl-worker{i}", daemon=True
            )
            for i in range(workers)
        ]
        self._threads += [
            threading.Thread(
                target=self._work,
                args=(self._compile_jobs,),
                name=f"mrpcd-ctl-bind{i}",
                daemon=True,
            )
            for i in range(compile_workers)
        ]
        self._loop_thread = threading.Thread(target=self._run, name="mrpcd-apps", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the loop's own descriptors (epoll, a wake-up pair, a spare) and start its threads."""
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._spare = spare_fd()
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        for conn in self._adopted:
            conn.fd = conn.sock.fileno()
            conn.sock.setblocking(False)
            self.conns[conn.fd] = conn
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            if conn.app is None:
                heapq.heappush(self._timers, (conn.deadline, next(self._seq), conn))
        self._adopted = []
        for t in self._threads:
            t.start()
        self._loop_thread.start()

    def stop(self) -> None:
        """Stop serving and close every connection (the daemon cleans its apps up itself)."""
        self._stopping.set()
        if self._loop_thread.is_alive():  # else never started, or stopped already
            self._wake()
            if threading.current_thread() is not self._loop_thread:
                self._loop_thread.join(5.0)
        for t in self._threads:
            if t.is_alive():
                (self._compile_jobs if t.name.startswith("mrpcd-ctl-bind") else self._jobs).put(
                    None
                )

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed (stopping)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _events in self._sel.select(self._timeout()):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    elif not key.data.closed:
                        try:
                            self._readable(key.data)
                        except (
                            Exception
                        ):  # a bug: cost only this connection, keep serving the others
                            log.exception(
                                "serving the control connection of pid %d failed", key.data.pid
                            )
                            self._close(key.data, "mrpcd failed on its control connection")
                self._finish_done()
                self._expire()
                if self._pause_asked.is_set():
                    self._hold()
        except Exception:
            log.exception("the app control loop failed; app control sockets are no longer served")
            raise
        finally:
            for conn in list(self.conns.values()):
                self._forget(conn)
                conn.sock.close()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()
            if self._spare is not None:
                os.close(self._spare)

    # ------------------------------------------------------------------ hot restart

    def adopt(self, conn: AppConn) -> None:
        """Before ``start``: serve a connection the old daemon handed over."""
        self._adopted.append(conn)

    def pause(self, timeout: float) -> bool:
        """Stop reading app sockets once no operation runs (what apps send waits in
        their sockets); True when paused within ``timeout``. ``resume`` undoes it."""
        self._resume.clear()
        self._pause_asked.set()
        self._wake()
        return self._paused.wait(timeout)

    def resume(self) -> None:
        self._pause_asked.clear()
        self._resume.set()

    def idle_connections(self) -> list[AppConn]:
        """While paused: the open connections (registered or not)."""
        assert self._paused.is_set()
        return [c for c in self.conns.values() if not c.closed]

    def _hold(self) -> None:
        """On the loop thread: wait for running operations, then pause until resumed."""
        while self._pause_asked.is_set():
            self._finish_done()
            with self._active_lock:
                idle = self._active == 0 and self._jobs.empty() and self._compile_jobs.empty()
            if idle and not any(c.busy for c in self.conns.values()):
                self._paused.set()
                self._resume.wait()
                self._paused.clear()
                return
            time.sleep(0.001)

    def _timeout(self) -> float | None:
        ends = []
        if self._timers:
            ends.append(self._timers[0][0])
        if self._listener_paused_until:
            ends.append(self._listener_paused_until)
        return max(0.0, min(ends) - time.monotonic()) if ends else None

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _expire(self) -> None:
        now = time.monotonic()
        if self._listener_paused_until and now >= self._listener_paused_until:
            self._listener_paused_until = 0.0
            self._sel.register(self.listener, selectors.EVENT_READ, None)
        while self._timers and self._timers[0][0] <= now:
            _, _, conn = heapq.heappop(self._timers)
            if conn.closed or conn.app is not None or conn.busy:
                continue  # a busy one is judged when its operation ends
            self._timed_out(conn)

    def _timed_out(self, conn: AppConn) -> None:
        log.info(
            "app connection closed: it did not register within %gs (apps.register_timeout)",
            self.register_timeout,
        )
        self._close(conn, "did not register")

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if (
                    e.errno in OUT_OF_FDS and self._spare is not None
                ):  # accept fails before it looks
                    os.close(self._spare)
                    self._refuse_one(
                        f"mrpcd is out of file descriptors ({e.strerror}); retry later or "
                        f"ask the operator to raise its fd limit (LimitNOFILE)"
                    )
                    self._spare = spare_fd()
                self._complain(logging.ERROR, "app socket accept failed: %s; backing off", e)
                self._sel.unregister(self.listener)  # level-triggered: it would wake us at once
                self._listener_paused_until = time.monotonic() + BACKOFF
                return
            try:
                sock.setblocking(False)
                pid, uid, gid = peer_credentials(sock)
                groups = peer_groups(sock)
                conn = AppConn(
                    sock,
                    pid,
                    uid,
                    gid,
                    groups,
                    time.monotonic() + self.register_timeout,
                    fd=sock.fileno(),
                )
                self._sel.register(sock, selectors.EVENT_READ, conn)
            except OSError as e:
                log.info("app control connection dropped on accept: %s", e)
                sock.close()
                continue
            self.conns[conn.fd] = conn
            heapq.heappush(self._timers, (conn.deadline, next(self._seq), conn))

    def _refuse_one(self, message: str) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        refuse_connection(sock, message)

    def _readable(self, conn: AppConn) -> None:
        try:
            msg, fds = recv_msg(conn.sock)
        except BlockingIOError:
            return
        except ValueError as e:
            self._reply(conn, error_reply(StatusCode.INVALID_ARGUMENT, f"bad control message: {e}"))
            return
        except OSError as e:
            log.info("app control connection error: %s", e)
            self._close(conn, f"control connection error: {e}")
            return
        for fd in fds:
            os.close(fd)
        if msg is None:
            self._close(conn, "application disconnected")
            return
        op = msg.get("op")
        if op in SLOW_OPS:
            conn.busy = True
            self._sel.unregister(conn.sock)
            (self._compile_jobs if op in COMPILE_OPS else self._jobs).put(
                lambda: self._slow(conn, msg)
            )
            return
        try:
            reply = self.handle(conn, msg)
        except OSError as e:
            self._close(conn, f"control connection error: {e}")
            return
        if reply is not None:
            self._reply(conn, reply)

    def _reply(self, conn: AppConn, reply: dict[str, Any]) -> None:
        error = send_reply(conn, reply)
        if error is not None:
            self._close(conn, error)

    def _finish_done(self) -> None:
        while True:
            try:
                conn, error = self._done.get_nowait()
            except queue.Empty:
                return
            conn.busy = False
            if conn.closed:
                continue
            if error is not None:
                self._close(conn, error)
            elif conn.app is None and time.monotonic() >= conn.deadline:
                self._timed_out(conn)
            else:
                self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _forget(self, conn: AppConn) -> None:
        conn.closed = True
        self.conns.pop(conn.fd, None)
        if not conn.busy:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass

    def _close(self, conn: AppConn, reason: str) -> None:
        self._forget(conn)
        conn.sock.close()
        if conn.app is not None:
            self._jobs.put(lambda: self._gone(conn, reason))

    def _gone(self, conn: AppConn, reason: str) -> None:
        """Clean up a registered app, then drop it: the timer heap may still hold
        ``conn`` until its registration deadline passes."""
        try:
            self.gone(conn, reason)
        finally:
            conn.app = None

    # ------------------------------------------------------------------ workers

    def _work(self, jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            with self._active_lock:
                self._active += 1
            try:
                job()
            except Exception:
                log.exception("an app control job failed")
            finally:
                with self._active_lock:
                    self._active -= 1

    def _slow(self, conn: AppConn, msg: dict[str, Any]) -> None:
        error: str | None = None
        try:
            reply = self.handle(conn, msg)
            if reply is not None:
                error = send_reply(conn, reply)
        except OSError as e:
            error = f"control connection error: {e}"
        except Exception:
            log.exception("control op %r of pid %d failed", msg.get("op"), conn.pid)
            error = "mrpcd failed on a control operation"
        finally:
            self._done.put((conn, error))
            self._wake()


def send_reply(conn: AppConn, reply: dict[str, Any], fds: list[int] | None = None) -> str | None:
    """Send without blocking; the reason to close the connection, or None if it went out."""
    try:
        send_msg(conn.sock, reply, fds)
    except BlockingIOError:
        log.info("app pid %d does not read its control socket; closing it", conn.pid)
        return "the app does not read its control socket"
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
            log.info("app control connection error: %s", e)
        return f"control connection error: {e}"
    return None
