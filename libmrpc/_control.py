"""Control-socket messages between applications (or operators) and the daemon.

Unix SOCK_SEQPACKET sockets keep message boundaries, so one message is one
packet: a JSON object, optionally with file descriptors attached (SCM_RIGHTS).
Requests carry ``op``; replies carry ``ok`` and either results or ``code``
(a gRPC status number) and ``error`` (what happened and what to do).
"""

from __future__ import annotations

import errno
import json
import re
import socket
import struct
from typing import Any

from libmrpc.status import RpcError, StatusCode

MAX_PACKET = 256 * 1024
MAX_FDS = 16
MAX_DEPTH = 32  # deepest JSON nesting a control message may have
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux: the peer's supplementary groups
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


class ControlError(RpcError):
    """The daemon answered a control request with an error."""


def open_control(path: str, timeout: float | None = 10.0) -> socket.socket:
    """Connect to a daemon's unix control socket; raise RpcError(UNAVAILABLE) if absent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_PACKET * 2)
        sock.settimeout(timeout)
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise RpcError(
            StatusCode.UNAVAILABLE,
            f"no mrpcd socket at {path}: start the daemon (`mrpcd run`) or set "
            f"MRPC_PREFIX / prefix= to the daemon's prefix",
        ) from None
    except PermissionError:
        sock.close()
        raise RpcError(
            StatusCode.PERMISSION_DENIED,
            f"not allowed to connect to {path}: check the socket's owner and group",
        ) from None
    except OSError as e:
        sock.close()
        raise RpcError(StatusCode.UNAVAILABLE, f"cannot connect to mrpcd at {path}: {e}") from None
    return sock


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_PACKET:
        raise RpcError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"control message of {len(data)} bytes exceeds {MAX_PACKET}",
        )
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its fds; ``(None, [])`` at end of stream.

    A packet that is not a JSON object raises ``ValueError`` (fds are closed).
    """
    msg, ancdata, flags, _addr = sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
    if not msg:
        _close_all(fds)
        return None, []
    try:
        if flags & socket.MSG_TRUNC:
            raise ValueError("control message truncated")
        check_depth(msg)
        try:
            obj = json.loads(msg)
        except RecursionError:
            raise ValueError(
                f"control message nests deeper than Python can parse (limit {MAX_DEPTH})"
            ) from None
        if not isinstance(obj, dict):
            raise ValueError("control message must be a JSON object")  # noqa: TRY004 - bad input from a peer, not a caller's type error
    except (ValueError, UnicodeDecodeError):
        _close_all(fds)
        raise
    return obj, fds


def check_depth(data: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise ValueError if the JSON text ``data`` nests arrays/objects deeper than ``limit``.

    Cheap: counting brackets settles nearly every message; otherwise strings are
    cut out and the brackets that are left are walked.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                raise ValueError(
                    f"control message nests JSON deeper than {limit} levels; flatten it"
                )
        else:
            depth -= 1


def _close_all(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def request(sock: socket.socket, obj: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Send a request and wait for its reply; raise ControlError for an error reply.

    If the daemon refused the connection and closed it before our request went
    out (e.g. RESOURCE_EXHAUSTED), its error reply is still read and raised.
    """
    try:
        send_msg(sock, obj)
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
        try:
            reply, fds = recv_msg(sock)
        except (OSError, ValueError):
            reply, fds = None, []
        if reply is None or reply.get("ok", False):
            _close_all(fds)
            raise RpcError(
                StatusCode.UNAVAILABLE, f"mrpcd closed the control connection: {e}"
            ) from None
    else:
        reply, fds = recv_msg(sock)
    try:
        return check_reply(reply), fds
    except RpcError:
        _close_all(fds)
        raise


def check_reply(reply: dict[str, Any] | None) -> dict[str, Any]:
    """``reply`` if it is a success; else raise ControlError with its status (UNKNOWN
    for a status number that is not one), or UNAVAILABLE at end of stream."""
    if reply is None:
        raise RpcError(StatusCode.UNAVAILABLE, "mrpcd closed the control connection")
    if not reply.get("ok", False):
        code = reply.get("code")
        if not isinstance(code, int) or code not in StatusCode._value2member_map_:
            code = StatusCode.UNKNOWN
        raise ControlError(code, str(reply.get("error", "unknown error")))
    return reply


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The supplementary group ids the peer of a unix socket had when it connected.

    Read with SO_PEERGROUPS (credentials captured by the kernel at connect(),
    not a racy look-up by pid). Empty if the kernel does not support it.
    """
    for size in (4 * 64, 4 * 65536):
        try:
            data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            if e.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                return frozenset()
            raise
        n = len(data) // 4
        return frozenset(struct.unpack(f"{n}I", data[: n * 4]))
    return frozenset()


def error_reply(code: StatusCode, message: str) -> dict[str, Any]:
    return {"ok": False, "code": int(code), "error": message}
