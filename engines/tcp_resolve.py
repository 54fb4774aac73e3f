"""Host names to addresses, off the runtime threads.

A runtime thread must never block, and ``getaddrinfo`` can take seconds when
DNS is down. The transport asks :func:`lookup`: an IP literal comes back at
once; a name comes back from a short-lived cache, or starts a resolution on a
small daemon-wide thread pool and the caller is told (``on_done``, from that
thread) when to ask again. Results — addresses and failures — are cached for
``TTL`` seconds. Tests replace :data:`resolve` to make resolution slow.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from collections.abc import Callable

TTL = 30.0  # seconds an address is reused
FAILURE_TTL = 2.0  # seconds a failure is reused
WORKERS = 2  # daemon threads (they never hold up the daemon's exit)


def _getaddrinfo(host: str, port: int) -> str:
    """The first address of ``host``; raises OSError (socket.gaierror) if there is none."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no address for {host}")
    return str(infos[0][4][0])


resolve: Callable[[str, int], str] = _getaddrinfo
"""The blocking resolver run on the worker threads; a test may replace it."""

_lock = threading.Lock()
_cache: dict[tuple[str, int], tuple[float, str | None, str]] = {}  # key -> (expires, addr, error)
_pending: dict[tuple[str, int], list[Callable[[], None]]] = {}  # key -> who to tell
_jobs: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
_workers: list[threading.Thread] = []


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _work() -> None:
    while True:
        key = _jobs.get()
        try:
            addr: str | None = resolve(*key)
            error, ttl = "", TTL
        except (OSError, UnicodeError, ValueError) as e:
            addr, error, ttl = None, str(getattr(e, "strerror", None) or e), FAILURE_TTL
        with _lock:
            now = time.monotonic()
            _cache[key] = (now + ttl, addr, error)
            waiters = _pending.pop(key, [])
            if len(_cache) > 4096:  # names nobody asks for any more
                for k in [k for k, v in _cache.items() if v[0] < now]:
                    del _cache[k]
        for notify in waiters:
            notify()


def lookup(host: str, port: int, on_done: Callable[[], None]) -> tuple[str | None, str] | None:
    """``(address, "")`` or ``(None, error)`` when known now; else None, and
    ``on_done()`` runs (on a resolver thread) once the answer is cached."""
    if is_ip(host):
        return host, ""
    key = (host, port)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1], hit[2]
        waiters = _pending.get(key)
        if waiters is not None:
            waiters.append(on_done)
            return None
        _pending[key] = [on_done]
        if len(_workers) < WORKERS:
            t = threading.Thread(target=_work, name=f"mrpcd-resolve{len(_workers)}", daemon=True)
            _workers.append(t)
            t.start()
    _jobs.put(key)
    return None


def forget() -> None:
    """Drop cached results (tests)."""
    with _lock:
        _cache.clear()
