"""The daemon's directories and files, made so that other local users cannot plant them.

How this works: every directory the daemon writes in (the prefix, the binding
cache, the directory of a socket configured outside the prefix) goes through
:func:`ensure_dir`: created with ``os.mkdir`` and an explicit mode, opened with
``O_NOFOLLOW | O_DIRECTORY`` and checked on that descriptor — a directory (not a
symlink), owned by the daemon's effective uid, not writable by group or others —
and every ancestor must be owned by root or by us and be closed to others' writes
unless it is sticky (like /tmp). A directory that fails a check is never fixed
up: the daemon refuses to start, naming the path, what is wrong and whose it is.
Files are created with ``O_EXCL | O_NOFOLLOW`` under a temporary name and renamed
into place, with explicit modes whatever the umask (:func:`write_file`). Unix
sockets are bound to a temporary name in their checked directory, given their
mode and renamed over the final name (:func:`unix_listener`).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
import socket
import stat
from pathlib import Path

from libmrpc.status import LocalError

log = logging.getLogger(__name__)


class PrefixError(LocalError):
    """A directory or file of the daemon is unsafe to use; nothing was changed."""


def owner_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _check_ancestors(path: Path, what: str) -> None:
    """Every directory above ``path`` is root's or ours, and closed to others unless sticky."""
    me = os.geteuid()
    real = Path(os.path.realpath(path.parent))
    for d in (real, *real.parents):
        st = os.stat(d)
        if st.st_uid not in (0, me):
            raise PrefixError(
                f"{what} {path}: its parent directory {d} belongs to {owner_name(st.st_uid)}, "
                f"who could replace it; use a directory under one owned by root or by "
                f"{owner_name(me)}"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise PrefixError(
                f"{what} {path}: its parent directory {d} is writable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}, not sticky), who could replace it; "
                f"use another directory"
            )


def check_dir_fd(fd: int, path: Path, what: str) -> os.stat_result:
    st = os.fstat(fd)
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise PrefixError(f"{what} {path} is not a directory; remove it or choose another path")
    if st.st_uid != me:
        raise PrefixError(
            f"{what} {path} belongs to {owner_name(st.st_uid)}, not to the daemon's "
            f"{owner_name(me)}: someone else created it; remove it or choose another path"
        )
    if st.st_mode & 0o022:
        raise PrefixError(
            f"{what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}), who could replace its sockets and files; "
            f"run `chmod go-w {path}` or choose another path"
        )
    return st


def ensure_dir(path: Path, mode: int, what: str = "directory", *, fix_mode: bool = True) -> None:
    """Create ``path`` (and missing parents, 0755) or verify the existing one; see the module doc.

    A directory it creates gets exactly ``mode``; an existing one too if
    ``fix_mode`` (else its mode is left, once checked).

    Raises :class:`PrefixError` for a symlink, a non-directory, another owner or
    a directory others may write; then nothing was created or changed.
    """
    path = Path(os.path.abspath(path))
    if not path.parent.exists():
        ensure_dir(path.parent, 0o755, "parent directory", fix_mode=False)
    _check_ancestors(path, what)
    created = False
    try:
        os.mkdir(path, 0o700)  # opened up below, after the checks, whatever the umask
        created = True
        log.info("created %s %s", what, path)
    except FileExistsError:
        pass
    except OSError as e:
        raise PrefixError(f"cannot create {what} {path}: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            target = os.readlink(path)
            who = owner_name(os.lstat(path).st_uid)
            raise PrefixError(
                f"{what} {path} is a symlink (to {target}, made by {who}); the daemon "
                f"does not follow symlinks there: remove it or choose another path"
            ) from None
        raise PrefixError(
            f"{what} {path} cannot be opened as a directory: {e.strerror}; remove it "
            f"or choose another path"
        ) from None
    try:
        st = check_dir_fd(fd, path, what)
        if (created or fix_mode) and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def open_file(path: Path, flags: int, mode: int) -> int:
    """Open (maybe create) a file of ours without following symlinks; fd with exactly ``mode``."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise PrefixError(
                f"{path} is not a regular file of {owner_name(os.geteuid())} (it belongs to "
                f"{owner_name(st.st_uid)}); remove it"
            )
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(path: Path, data: bytes, mode: int, *, durable: bool = False) -> None:
    """Atomically replace ``path`` (in a checked directory) with ``data``, file mode ``mode``.

    ``durable``: also fsync the file before the rename and the directory after
    it, so a crash or power loss leaves the old or the new content, never none."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        if durable:
            os.fsync(fd)
        os.replace(tmp, path)
        if durable:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


def unix_listener(path: Path, mode: int, group: str | None = None) -> socket.socket:
    """A listening SEQPACKET socket at ``path`` with ``mode`` (and ``group``).

    Bound under a temporary name in the same (checked) directory and renamed over
    ``path``, so the socket is never reachable with the umask's mode and nobody
    can slip another file in between. Raises :class:`PrefixError`.
    """
    ensure_dir(path.parent, 0o755, "socket directory", fix_mode=False)
    tmp = path.with_name(f".s{secrets.token_hex(3)}")
    if len(os.fsencode(tmp)) > 107:
        tmp = path
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(tmp))
        try:
            gid = grp.getgrnam(group).gr_gid if group else -1
            if gid != -1:
                os.chown(tmp, -1, gid, follow_symlinks=False)
            os.chmod(tmp, mode)
            if tmp != path:
                os.rename(tmp, path)
        except BaseException:
            if tmp != path:
                os.unlink(tmp)
            raise
        sock.listen(128)
    except KeyError:
        sock.close()
        raise PrefixError(
            f"operator_group {group!r} does not exist; create it or set operator_group: null"
        ) from None
    except OSError as e:
        sock.close()
        raise PrefixError(
            f"cannot create unix socket {path}: {e.strerror}; remove what is there or choose "
            f"another path"
        ) from None
    return sock
