"""Where a daemon lives: its prefix directory and the files in it.

An application trusts a daemon only if root, its own user or the user named by
``MRPC_DAEMON_USER`` runs it: before it connects, the prefix, ``mrpcd.json`` and the socket must belong to root or to
the application's effective uid and be closed to others' writes (so no other
local user can have planted them or swapped the socket), and after connecting
the peer's credentials must say the same (:func:`check_daemon_peer`).
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

from libmrpc.status import RpcError, StatusCode

MAX_STATE_FILE = 64 * 1024


def _trusted_uids() -> tuple[int, ...]:
    """root, our euid, and the user named by ``MRPC_DAEMON_USER`` (a daemon run as a service user)."""
    extra = os.environ.get("MRPC_DAEMON_USER", "").strip()
    if not extra:
        return (0, os.geteuid())
    try:
        uid = int(extra) if extra.isdigit() else pwd.getpwnam(extra).pw_uid
    except KeyError:
        raise RpcError(
            StatusCode.INVALID_ARGUMENT,
            f"MRPC_DAEMON_USER={extra!r} names no user; set it to the daemon's user name or uid",
        ) from None
    return (0, os.geteuid(), uid)


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def default_prefix(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """The default prefix of a daemon (and of apps) running as ``uid`` (default: the euid).

    ``$RUNTIME_DIRECTORY`` (set by systemd for a service with ``RuntimeDirectory=``)
    if set; else root gets ``/run/mrpc``; other users ``$XDG_RUNTIME_DIR/mrpc`` if
    that is a directory they own with mode 0700, else ``/tmp/mrpc-<uid>`` (which
    the daemon refuses if someone else created it first).
    """
    env = os.environ if env is None else env
    uid = os.geteuid() if uid is None else uid
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if os.path.isabs(runtime):
        return Path(runtime)
    if uid == 0:
        return Path("/run/mrpc")
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        if (
            st is not None
            and stat.S_ISDIR(st.st_mode)
            and st.st_uid == uid
            and stat.S_IMODE(st.st_mode) == 0o700
        ):
            return Path(xdg) / "mrpc"
    return Path(f"/tmp/mrpc-{uid}")


def resolve_prefix(prefix: str | os.PathLike[str] | None) -> Path:
    """``prefix``, else ``MRPC_PREFIX``, else the daemon's default prefix."""
    if prefix:
        return Path(prefix)
    env = os.environ.get("MRPC_PREFIX")
    return Path(env) if env else default_prefix()


def _trusted_text() -> str:
    names = ["root"] + [_who(u) for u in dict.fromkeys(_trusted_uids()[1:]) if u != 0]
    return " or ".join(names) + " (MRPC_DAEMON_USER adds a user)"


def _refuse(path: Path | str, what: str, st: os.stat_result, problem: str) -> RpcError:
    return RpcError(
        StatusCode.PERMISSION_DENIED,
        f"refusing to use mrpcd {what} {path}: {problem} (owner {_who(st.st_uid)}, mode "
        f"{stat.S_IMODE(st.st_mode):04o}); only a daemon run by {_trusted_text()} is trusted: "
        f"check who started it, or set MRPC_PREFIX / prefix= to your daemon's prefix",
    )


def _check_owner(
    path: Path | str, what: str, st: os.stat_result, *, others_may_write: bool = False
) -> None:
    if st.st_uid not in _trusted_uids():
        raise _refuse(path, what, st, "it belongs to another user")
    if st.st_mode & 0o022 and not others_may_write:
        raise _refuse(path, what, st, "others may write it")


def check_prefix(prefix: Path) -> bool:
    """Check a daemon's prefix before trusting what is in it; False if it does not exist.

    Raises RpcError(PERMISSION_DENIED) naming the path and its owner.
    """
    try:
        st = os.stat(prefix)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(prefix, "prefix", st, "it is not a directory")
    _check_owner(prefix, "prefix", st)
    return True


def daemon_state(prefix: Path) -> dict[str, object]:
    """The daemon's ``mrpcd.json`` (empty if the daemon has not written it).

    Read without following a symlink; raises RpcError(PERMISSION_DENIED) if the
    file belongs to someone other than root or us, or others may write it.
    """
    try:
        fd = os.open(
            prefix / "mrpcd.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        )
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(prefix / "mrpcd.json", "state file", st, "it is not a regular file")
        _check_owner(prefix / "mrpcd.json", "state file", st)
        raw = f.read(MAX_STATE_FILE + 1)
    try:
        data = json.loads(raw) if len(raw) <= MAX_STATE_FILE else None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _socket_path(prefix: Path, key: str, default: str) -> str:
    if not check_prefix(prefix):
        return str(prefix / default)  # connecting fails with "no mrpcd socket at ..."
    path = daemon_state(prefix).get(key)
    sock = Path(path) if isinstance(path, str) and os.path.isabs(path) else prefix / default
    if sock.parent != prefix:
        try:
            st = os.stat(sock.parent)
        except OSError:
            return str(sock)
        _check_owner(
            sock.parent, "socket directory", st, others_may_write=bool(st.st_mode & stat.S_ISVTX)
        )
    try:
        st = os.lstat(sock)
    except OSError:
        return str(sock)
    if not stat.S_ISSOCK(st.st_mode):
        raise _refuse(sock, "socket", st, "it is not a unix socket")
    _check_owner(sock, "socket", st, others_may_write=True)
    return str(sock)


def app_socket_path(prefix: Path) -> str:
    """The application socket of the daemon at ``prefix``, after the ownership checks."""
    return _socket_path(prefix, "app_socket", "app.sock")


def operator_socket_path(prefix: Path) -> str:
    """The operator socket of the daemon at ``prefix``, after the ownership checks."""
    return _socket_path(prefix, "operator_socket", "ctl.sock")


def check_daemon_peer(sock: socket.socket, path: str) -> None:
    """Refuse a connected control socket whose listener is not root or us."""
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in _trusted_uids():
        raise RpcError(
            StatusCode.PERMISSION_DENIED,
            f"refusing the mrpcd at {path}: it runs as {_who(uid)} (pid {pid}); only a daemon "
            f"run by {_trusted_text()} is trusted: check who started it, or set MRPC_PREFIX / "
            f"prefix= to your daemon's prefix",
        )
