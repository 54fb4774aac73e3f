"""Control-socket messages: one JSON object per SEQPACKET packet, fds alongside."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from libmrpc._control import (
    MAX_PACKET,
    ControlError,
    error_reply,
    open_control,
    peer_credentials,
    recv_msg,
    request,
    send_msg,
)
from libmrpc.status import RpcError, StatusCode

Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.settimeout(5)
    with a, b:
        yield a, b


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_round_trip_without_fds(pair: Pair) -> None:
    a, b = pair
    msg = {"op": "register", "name": "kv \u2603", "n": [1, 2.5, None, True], "nested": {"x": "y"}}
    send_msg(a, msg)
    send_msg(a, {})
    assert recv_msg(b) == (msg, [])
    assert recv_msg(b) == ({}, [])  # one packet, one message: boundaries are kept


def test_round_trip_with_an_eventfd(pair: Pair) -> None:
    a, b = pair
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        send_msg(a, {"op": "take"}, [efd])
        msg, fds = recv_msg(b)
        assert msg == {"op": "take"} and len(fds) == 1
        (got,) = fds
        assert got != efd
        os.eventfd_write(got, 5)  # the received fd is the same eventfd
        assert os.eventfd_read(efd) == 5
        os.close(got)
    finally:
        os.close(efd)


def test_several_fds_keep_their_order(pair: Pair) -> None:
    a, b = pair
    r, w = os.pipe()
    efd = os.eventfd(0)
    try:
        send_msg(a, {"fds": 3}, [r, efd, w])
        _, (r2, efd2, w2) = recv_msg(b)
        os.write(w2, b"via the passed pipe")
        assert os.read(r, 100) == b"via the passed pipe"
        os.eventfd_write(efd, 2)
        assert os.eventfd_read(efd2) == 2
        for fd in (r2, efd2, w2):
            os.close(fd)
    finally:
        for fd in (r, w, efd):
            os.close(fd)


def test_eof(pair: Pair) -> None:
    a, b = pair
    a.close()
    assert recv_msg(b) == (None, [])


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b"42", b'"str"', b"\xff\xfe{}", b"{"])
def test_bad_packet_raises_value_error_and_closes_fds(pair: Pair, data: bytes) -> None:
    a, b = pair
    efd = os.eventfd(0)
    try:
        socket.send_fds(a, [data], [efd, efd])
        before = open_fds()
        with pytest.raises(ValueError):
            recv_msg(b)
        assert open_fds() == before  # the two received fds were closed again
    finally:
        os.close(efd)


def test_truncated_packet_is_refused(pair: Pair) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_PACKET * 4)
    a.send(b"{" + b" " * MAX_PACKET + b"}")
    with pytest.raises(ValueError, match="truncated"):
        recv_msg(b)


def test_oversized_message_is_refused_before_sending(pair: Pair) -> None:
    a, _ = pair
    with pytest.raises(RpcError, match=f"exceeds {MAX_PACKET}") as info:
        send_msg(a, {"blob": "x" * MAX_PACKET})
    assert info.value.code() is StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------ request / reply


def test_request_ok(pair: Pair) -> None:
    """The reply is queued first (a socket pair buffers it), then request() sends and reads."""
    a, b = pair
    efd = os.eventfd(0)
    try:
        send_msg(b, {"ok": True, "app_id": 7}, [efd])
        reply, fds = request(a, {"op": "register", "name": "kv"})
        assert reply == {"ok": True, "app_id": 7} and len(fds) == 1
        os.close(fds[0])
    finally:
        os.close(efd)
    assert recv_msg(b) == ({"op": "register", "name": "kv"}, [])


def test_request_error_reply_raises_control_error(pair: Pair) -> None:
    a, b = pair
    efd = os.eventfd(0)
    try:
        send_msg(b, error_reply(StatusCode.NOT_FOUND, "no app 'kv': register it first"), [efd])
        before = open_fds()
        with pytest.raises(ControlError) as info:
            request(a, {"op": "stats", "app": "kv"})
        assert open_fds() == before  # fds on an error reply are closed
    finally:
        os.close(efd)
    err = info.value
    assert isinstance(err, RpcError)
    assert err.code() is StatusCode.NOT_FOUND
    assert err.details() == "no app 'kv': register it first"


def test_request_error_without_code(pair: Pair) -> None:
    a, b = pair
    send_msg(b, {"ok": False})
    with pytest.raises(ControlError) as info:
        request(a, {"op": "x"})
    assert info.value.code() is StatusCode.UNKNOWN and info.value.details() == "unknown error"


def test_request_error_with_unknown_code(pair: Pair) -> None:
    a, b = pair
    for code in (99, -1, "NOT_FOUND", None, 2.5):
        send_msg(b, {"ok": False, "code": code, "error": "from a newer daemon"})
        with pytest.raises(ControlError) as info:
            request(a, {"op": "x"})
        assert info.value.code() is StatusCode.UNKNOWN
        assert info.value.details() == "from a newer daemon"


def test_request_on_closed_connection(pair: Pair) -> None:
    a, b = pair
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(RpcError, match="closed the control connection") as info:
        request(a, {"op": "x"})
    assert info.value.code() is StatusCode.UNAVAILABLE


def test_error_reply_shape() -> None:
    assert error_reply(StatusCode.UNAVAILABLE, "draining") == {
        "ok": False,
        "code": 14,
        "error": "draining",
    }


# ------------------------------------------------------------------ sockets


def test_peer_credentials(pair: Pair) -> None:
    a, b = pair
    assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
    assert peer_credentials(b) == (os.getpid(), os.getuid(), os.getgid())


def test_open_control_missing_socket(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(RpcError, match="no mrpcd socket at .*start the daemon") as info:
        open_control(os.path.join(tmp_path, "absent.sock"), timeout=1)
    assert info.value.code() is StatusCode.UNAVAILABLE


def test_open_control_connects(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "ctl.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(path)
        server.listen(1)
        client = open_control(path, timeout=2)
        conn, _ = server.accept()
        with client, conn:
            send_msg(client, {"op": "hello"})
            assert recv_msg(conn) == ({"op": "hello"}, [])
            assert peer_credentials(conn)[0] == os.getpid()


# -- nesting depth and peer groups ----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":' + b"[" * 31 + b"]" * 31 + b"}",  # 32 levels with the object
        b'{"s":"' + b"[{" * 5000 + b'"}',
        b'{"s":"\\"' + b"[" * 100 + b'","t":[1]}',
    ],
)
def test_depth_within_limit_or_inside_strings_is_fine(text: bytes) -> None:
    from libmrpc._control import check_depth

    check_depth(text)


def test_deep_nesting_is_a_value_error_not_recursion(pair: Pair) -> None:
    a, b = pair
    a.sendall(b'{"op":"x","y":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(ValueError, match="deeper than 32"):
        recv_msg(b)
    send_msg(a, {"op": "ping"})  # the connection still works
    assert recv_msg(b)[0] == {"op": "ping"}


def test_peer_groups_are_this_process_groups(pair: Pair) -> None:
    from libmrpc._control import peer_groups

    assert peer_groups(pair[0]) == frozenset(os.getgroups())
