"""Telling systemd how the daemon is doing: sd_notify(3) over ``NOTIFY_SOCKET``.

How this works: :meth:`Notifier.from_environ` reads ``NOTIFY_SOCKET`` (a path,
or an abstract name written ``@name``) and ``WATCHDOG_USEC``/``WATCHDOG_PID``,
then removes them from ``os.environ`` so that no child (the schema compiler,
protoc) talks to systemd in the daemon's name. Each message is one datagram of
``KEY=VALUE`` lines sent from a fresh ``AF_UNIX``/``SOCK_DGRAM`` socket
(close-on-exec). Without ``NOTIFY_SOCKET`` every call does nothing. A failed
send never raises into the daemon: the first failure is logged as a warning,
later ones at debug level.

The daemon sends ``READY=1`` once its sockets accept and ``mrpcd.json`` is
written, ``STATUS=`` lines while it serves, ``RELOADING=1`` (with
``MONOTONIC_USEC=``, which systemd 253 and later want) then ``READY=1`` around a
SIGHUP reload, and ``STOPPING=1`` when SIGTERM starts the drain. With
``WatchdogSec=`` set, :class:`Watchdog` sends ``WATCHDOG=1`` from its own thread,
and only while every runtime answers a no-op call: a wedged runtime stops the
pings and systemd restarts the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

_CHILD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or None if it is unusable."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock: and relative paths are not supported


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, notify_socket: str | None, watchdog_usec: int = 0) -> None:
        self.target = notify_socket or None
        self.address = socket_address(notify_socket) if notify_socket else None
        self.watchdog_usec = watchdog_usec
        self._warned = False
        self._lock = threading.Lock()
        if self.target and self.address is None:
            log.warning(
                "NOTIFY_SOCKET=%r is neither an absolute path nor an @abstract name; "
                "not notifying the service manager",
                self.target,
            )

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        """Read and unset ``NOTIFY_SOCKET`` and the watchdog variables (children must not see them)."""
        env = os.environ if env is None else env
        values = {k: env.pop(k, "") for k in _CHILD_ENV}
        usec = 0
        if values["WATCHDOG_USEC"].isdigit():
            usec = int(values["WATCHDOG_USEC"])
        pid = values["WATCHDOG_PID"]
        if pid and pid != str(os.getpid()):
            usec = 0  # the watchdog is meant for another process
        return cls(values["NOTIFY_SOCKET"] or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one message; True if it was sent. Never raises."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
        except OSError as e:
            with self._lock:
                first, self._warned = not self._warned, True
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "cannot notify the service manager at NOTIFY_SOCKET=%s: %s%s",
                self.target,
                e.strerror or e,
                " (further failures are logged at debug level)" if first else "",
            )
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str = "") -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def mainpid(self, pid: int) -> bool:
        """Tell systemd another process is the main one now (for a hot restart)."""
        return self.send(f"MAINPID={pid}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _status(text: str) -> tuple[str, ...]:
    text = " ".join(text.split())  # one line: a newline would end the STATUS= field
    return (f"STATUS={text}",) if text else ()


class Watchdog:
    """Pings ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while ``healthy(timeout)`` says so."""

    def __init__(self, notifier: Notifier, healthy: Callable[[float], bool]) -> None:
        self.notifier = notifier
        self.interval = notifier.watchdog_usec / 2e6
        self.healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mrpcd-watchdog", daemon=True)

    def start(self) -> None:
        if self.notifier.enabled and self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        sick = False
        while not self._stop.is_set():
            try:
                ok = self.healthy(self.interval / 2)  # pings stay < 1.5 intervals apart
            except Exception as e:  # noqa: BLE001 - any failure means "not healthy"
                log.debug("watchdog health check failed: %s", e)
                ok = False
            if ok:
                self.notifier.watchdog()
                if sick:
                    log.warning("runtimes answer again: watchdog pings resumed")
            elif not sick:
                log.error(
                    "a runtime did not answer within %.1fs: no watchdog pings until it does "
                    "(systemd restarts mrpcd when WatchdogSec= runs out)",
                    self.interval / 2,
                )
            sick = not ok
            self._stop.wait(self.interval)
