"""The hot restart's channel between the old and the new mrpcd process.

A unix stream socketpair: the old process keeps one end, the new one inherits
the other (``mrpcd run --takeover-fd N``). Each message is a versioned document
(plain data: dicts, lists, tuples, str, int, float, bytes; pickled, since both
ends are the same daemon under the same uid and the peer is checked by its
credentials) followed by its file descriptors, sent with SCM_RIGHTS in chunks
of at most ``FDS_PER_CHUNK`` (the kernel's limit is 253 per message).

Documents (``msg``):

``prepare`` (old -> new)
    the schema texts the apps bound: the new process binds them (from the
    binding cache) before the old one stops anything.
``loaded`` (new -> old)
    imports, config and bindings are done.
``state`` (old -> new)
    everything the old process had, quiesced (``mrpcd/hotrestart.py``), with its fds.
``restored`` (new -> old)
    the new process built its daemon from it; it serves nothing yet.
``commit`` (old -> new)
    the old process leaves; the new one starts serving.
``error`` (new -> old)
    ``reason``: why the new process cannot take over (the old one rolls back).
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
from typing import Any

VERSION = 1
FDS_PER_CHUNK = 250
_HEADER = struct.Struct("!QI")  # body length, number of fds
MAX_BODY = 1 << 30


class HandoverError(Exception):
    """The other process broke the hand-over protocol, hung up or timed out."""


def send_doc(sock: socket.socket, doc: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
    body = pickle.dumps(dict(doc, version=VERSION), protocol=pickle.HIGHEST_PROTOCOL)
    fds = list(fds)
    sock.sendall(_HEADER.pack(len(body), len(fds)) + body)
    for i in range(0, len(fds), FDS_PER_CHUNK):
        socket.send_fds(sock, [b"F"], fds[i : i + FDS_PER_CHUNK])


def recv_doc(sock: socket.socket, deadline: float) -> tuple[dict[str, Any], list[int]]:
    """The next document and its fds (the caller owns them); HandoverError on EOF,
    a timeout at the monotonic ``deadline`` or a malformed message."""
    length, nfds = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    if length > MAX_BODY:
        raise HandoverError(f"a hand-over document of {length} bytes; at most {MAX_BODY}")
    body = _recv_exact(sock, length, deadline)
    fds: list[int] = []
    try:
        while len(fds) < nfds:
            _settimeout(sock, deadline)
            try:
                data, got, _flags, _addr = socket.recv_fds(sock, 1, FDS_PER_CHUNK)
            except TimeoutError:
                raise HandoverError("timed out receiving descriptors") from None
            if not data:
                raise HandoverError("the other mrpcd process hung up while passing descriptors")
            fds.extend(got)
        doc = pickle.loads(body)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        for fd in fds:
            os.close(fd)
        raise HandoverError(
            f"hand-over document version {doc.get('version') if isinstance(doc, dict) else '?'}"
            f", this mrpcd speaks {VERSION}"
        )
    return doc, fds


def _settimeout(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise HandoverError("timed out")
    sock.settimeout(left)


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        _settimeout(sock, deadline)
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except TimeoutError:
            raise HandoverError("timed out") from None
        except OSError as e:
            raise HandoverError(f"the hand-over socket failed: {e}") from None
        if not chunk:
            raise HandoverError("the other mrpcd process hung up")
        buf += chunk
    return bytes(buf)


def check_peer(sock: socket.socket, pid: int | None) -> None:
    """The other end runs as our uid (and, when given, is process ``pid``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    peer_pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid() or (pid is not None and peer_pid != pid):
        raise HandoverError(
            f"the hand-over peer is pid {peer_pid} uid {uid}; expected "
            f"{'pid ' + str(pid) + ' ' if pid is not None else ''}uid {os.getuid()}"
        )
