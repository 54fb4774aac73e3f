"""Accept loops for the daemon's unix control sockets that survive resource exhaustion.

The operator socket is served here, a thread per connection (operators are few);
app connections are served by one event loop (``mrpcd.control_loop``), which
shares the out-of-fds handling below.

How this works: each accepted connection gets its own thread. When the process
is out of file descriptors (EMFILE/ENFILE) ``accept`` fails while the
connection waits in the backlog; a spare descriptor is then released, the
connection accepted, told RESOURCE_EXHAUSTED and closed, and the spare taken
again. When a thread cannot be started (a pids limit, RLIMIT_NPROC, memory),
the connection is told the same and closed. Either way the loop logs at most
once per ``LOG_EVERY`` seconds, backs off briefly and keeps serving.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

from libmrpc._control import error_reply
from libmrpc.status import StatusCode

log = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between two log lines about refused connections
BACKOFF = 0.05  # seconds to wait after a refusal
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


class RateLimitedLog:
    """Log a recurring problem at most once per ``every`` seconds, with a count."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self._last = -1e9
        self._suppressed = 0

    def __call__(self, level: int, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        log.log(level, fmt + more, *args)
        self._last, self._suppressed = now, 0


def refuse_connection(sock: socket.socket, message: str) -> None:
    """Tell the peer RESOURCE_EXHAUSTED (if it can be done without blocking) and close."""
    try:
        sock.setblocking(False)
        sock.send(json.dumps(error_reply(StatusCode.RESOURCE_EXHAUSTED, message)).encode())
    except OSError:
        pass
    finally:
        sock.close()


def spare_fd() -> int | None:
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _refuse_one_waiting(listener: socket.socket, message: str) -> None:
    """Refuse one connection waiting in the backlog, if there is one (never waits)."""
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    if not poller.poll(0):
        return
    try:
        sock, _ = listener.accept()  # only this thread accepts: the connection is still there
    except OSError:
        return
    refuse_connection(sock, message)


def accept_loop(
    listener: socket.socket,
    serve: Callable[[socket.socket], None],
    what: str,
    stopping: threading.Event,
) -> None:
    """Accept connections on ``listener`` and run ``serve(sock)`` on a thread each, until ``stopping``."""
    complain = RateLimitedLog()
    spare = spare_fd()
    try:
        while not stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError as e:
                if stopping.is_set():
                    return
                if (
                    e.errno in OUT_OF_FDS and spare is not None
                ):  # accept fails before it looks for a peer
                    os.close(spare)
                    _refuse_one_waiting(
                        listener,
                        f"mrpcd is out of file descriptors ({e.strerror}); retry "
                        f"later or ask the operator to raise its fd limit",
                    )
                    spare = spare_fd()
                complain(logging.ERROR, "%s socket accept failed: %s; backing off", what, e)
                time.sleep(BACKOFF if e.errno in OUT_OF_FDS else 0.1)
                continue
            try:
                threading.Thread(
                    target=serve, args=(sock,), name=f"mrpcd-{what}-conn", daemon=True
                ).start()
            except (
                RuntimeError,
                MemoryError,
            ) as e:  # "can't start new thread": pids limit, RLIMIT_NPROC
                refuse_connection(
                    sock, f"mrpcd cannot take another {what} connection now ({e}); retry later"
                )
                complain(
                    logging.ERROR,
                    "refused a %s connection: cannot start its thread (%s); "
                    "is mrpcd at its pids/threads limit?",
                    what,
                    e,
                )
                time.sleep(BACKOFF)
    finally:
        if spare is not None:
            os.close(spare)
