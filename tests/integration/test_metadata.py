"""Call metadata (gRPC headers) end to end: app -> daemon -> peer daemon -> handler."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

import libmrpc
from libmrpc import RpcError, StatusCode
from tests.integration.conftest import ROOT, Cluster

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


class Recorder(testing.TestServicer):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def Call(self, request, context):  # type: ignore[no-untyped-def]
        self.seen.append(context.invocation_metadata())
        return testing.Reply(key=request.key, served_by="recorder")


def setup(cluster: Cluster, name: str = "meta-srv") -> tuple[Any, Any, Any, Recorder, Any]:
    a = cluster.daemon("a")
    b = cluster.daemon("b")
    rec = Recorder()
    server = libmrpc.Server(prefix=b.prefix, name=name)
    server.add_servicer(rec)
    server.start()
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="meta-client"))
    stub.Call(testing.Request(key="warm"), timeout=10)
    return a, b, stub, rec, server


def heaps_settle(daemon: Any, name: str) -> dict[str, Any]:
    """The app's listing once its receive heap is empty again (releases are batched)."""
    deadline = time.monotonic() + 5
    while True:
        app = next(x for x in daemon.apps() if x["name"] == name)
        if app["recv_heap"]["used"] == 0 or time.monotonic() > deadline:
            return app
        time.sleep(0.1)


def test_metadata_reaches_the_handler_sync_future_and_aio(cluster: Cluster) -> None:
    a, b, stub, rec, server = setup(cluster)
    md = [
        ("authorization", "Bearer t0k"),
        ("trace-bin", b"\x00\xff\x01"),
        ("x-multi", "1"),
        ("x-multi", "2"),
    ]
    assert stub.Call(testing.Request(key="s"), timeout=10, metadata=md).key == "s"
    assert stub.Call.future(testing.Request(key="f"), timeout=10, metadata=md).result().key == "f"
    import asyncio

    assert asyncio.run(stub.Call.aio(testing.Request(key="a"), timeout=10, metadata=md)).key == "a"
    assert stub.Call(testing.Request(key="none"), timeout=10).key == "none"
    want = tuple(md)
    assert rec.seen[-4:] == [want, want, want, ()], rec.seen[-4:]
    # the metadata blocks are reclaimed on both sides
    assert heaps_settle(b, "meta-srv")["recv_heap"]["used"] == 0
    assert heaps_settle(a, "meta-client")["recv_heap"]["used"] == 0
    server.stop(0)


@pytest.mark.parametrize(
    "key,value,why",
    [
        ("Authorization", "x", "invalid"),
        ("grpc-timeout", "1S", "reserved"),
        ("bad key", "x", "invalid"),
        ("", "x", "invalid"),
        ("text", "line\nbreak", "printable"),
    ],
)
def test_metadata_key_rules_are_invalid_argument(
    cluster: Cluster, key: str, value: str, why: str
) -> None:
    _a, _b, stub, rec, server = setup(cluster)
    n = len(rec.seen)
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(key="k"), timeout=10, metadata=[(key, value)])
    assert e.value.code() is StatusCode.INVALID_ARGUMENT, e.value
    assert why in e.value.details(), e.value.details()
    assert len(rec.seen) == n  # never reached the server
    assert stub.Call(testing.Request(key="ok"), timeout=10, metadata=[("k", "v")]).key == "ok"
    server.stop(0)


def test_metadata_over_the_size_limit_is_resource_exhausted(cluster: Cluster) -> None:
    a, _b, stub, rec, server = setup(cluster)
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(key="k"), timeout=10, metadata=[("big-bin", b"x" * 9000)])
    assert e.value.code() is StatusCode.RESOURCE_EXHAUSTED, e.value
    assert "8192" in e.value.details(), e.value.details()
    # just under the limit passes
    ok = [("big-bin", b"x" * (8192 - 6 - 6 - 7))]
    assert stub.Call(testing.Request(key="k"), timeout=10, metadata=ok).key == "k"
    assert rec.seen[-1] == tuple(ok)
    assert heaps_settle(a, "meta-client")["recv_heap"]["used"] == 0
    server.stop(0)


def test_acl_on_a_metadata_token(cluster: Cluster) -> None:
    _a, b, stub, rec, server = setup(cluster)
    b.ctl(
        "policy",
        "attach",
        "--file",
        str(ROOT / "policies" / "acl-token.yaml"),
        "--app",
        "meta-srv",
        "--set",
        'rules=[{name: tok, action: allow, metadata: authorization, equals: "Bearer s3cret"}]',
    )
    n = len(rec.seen)
    for md in (None, [("authorization", "Bearer wrong")], [("other", "Bearer s3cret")]):
        with pytest.raises(RpcError) as e:
            stub.Call(testing.Request(key="k"), timeout=10, metadata=md)
        assert e.value.code() is StatusCode.PERMISSION_DENIED, e.value
        assert "s3cret" not in e.value.details() and "wrong" not in e.value.details()
    assert len(rec.seen) == n  # the server app never saw them
    good = [("authorization", "Bearer s3cret")]
    assert stub.Call(testing.Request(key="k"), timeout=10, metadata=good).key == "k"
    assert rec.seen[-1] == tuple(good)
    server.stop(0)


class Waiter(testing.TestServicer):  # type: ignore[misc,name-defined]
    """Holds each call until its context turns inactive (or 8 s pass)."""

    def __init__(self) -> None:
        import threading

        self.entered = threading.Event()
        self.outcomes: list[tuple[bool, int]] = []  # (saw inactive, callbacks run)
        self.done = threading.Event()

    def Call(self, request, context):  # type: ignore[no-untyped-def]
        if request.key == "now":
            return testing.Reply(key="now")
        ran: list[int] = []
        assert context.add_callback(lambda: ran.append(1))
        self.entered.set()
        t0 = time.monotonic()
        while context.is_active() and time.monotonic() - t0 < 8:
            time.sleep(0.01)
        self.outcomes.append((not context.is_active(), len(ran)))
        self.done.set()
        return testing.Reply(key="late")


def cancel_setup(cluster: Cluster) -> tuple[Any, Any, Any, Waiter, Any]:
    a = cluster.daemon("a")
    b = cluster.daemon("b")
    w = Waiter()
    server = libmrpc.Server(prefix=b.prefix, name="cancel-srv")
    server.add_servicer(w)
    server.start()
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="cancel-client"))
    return a, b, stub, w, server


def check_reclaimed(a: Any, b: Any) -> None:
    deadline = time.monotonic() + 5
    while True:
        cli = next(x for x in a.apps() if x["name"] == "cancel-client")
        srv = next(x for x in b.apps() if x["name"] == "cancel-srv")
        figures = (
            cli["recv_heap"]["used"],
            srv["recv_heap"]["used"],
            cli["inflight_calls"],
            srv["serving_calls"],
        )
        if figures == (0, 0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    print(
        f"\nclient recv_heap used, server recv_heap used, client inflight, server serving: {figures}"
    )
    assert figures == (0, 0, 0, 0), figures


def test_future_cancel_reaches_the_server_handler(cluster: Cluster) -> None:
    a, b, stub, w, server = cancel_setup(cluster)
    fut = stub.Call.future(testing.Request(key="c"), timeout=30)
    assert w.entered.wait(10)
    t0 = time.monotonic()
    assert fut.cancel() is True
    with pytest.raises(RpcError) as e:
        fut.result()
    assert e.value.code() is StatusCode.CANCELLED, e.value
    assert fut.cancelled() and fut.done() and fut.cancel() is False
    assert w.done.wait(10)
    print(f"handler saw the cancel after {time.monotonic() - t0:.3f}s")
    assert w.outcomes == [(True, 1)]  # is_active() turned False; the callback ran once
    check_reclaimed(a, b)
    assert stub.Call(testing.Request(key="now"), timeout=10).key == "now"  # still serving
    server.stop(0)


def test_cancelling_an_aio_task_cancels_the_call(cluster: Cluster) -> None:
    import asyncio

    a, b, stub, w, server = cancel_setup(cluster)

    async def run() -> None:
        task = asyncio.ensure_future(stub.Call.aio(testing.Request(key="c"), timeout=30))
        while not w.entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert w.done.wait(10)
    assert w.outcomes == [(True, 1)]
    check_reclaimed(a, b)
    server.stop(0)


def test_a_nested_call_inherits_the_remaining_deadline(cluster: Cluster) -> None:
    a = cluster.daemon("a")
    b = cluster.daemon("b")

    class Relay(testing.TestServicer):  # type: ignore[misc,name-defined]
        stub: Any = None

        def Call(self, request, context):  # type: ignore[no-untyped-def]
            if request.key == "leaf":
                return testing.Reply(key=repr(context.time_remaining()))
            return testing.Reply(key=self.stub.Call(testing.Request(key="leaf")).key)  # no timeout

    relay = Relay()
    server = libmrpc.Server(prefix=b.prefix, name="relay")
    server.add_servicer(relay)
    server.start()
    relay.stub = testing.TestStub(libmrpc.connect(b.listen, prefix=b.prefix, name="relay"))
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="caller"))
    seen = stub.Call(testing.Request(key="relay"), timeout=3).key
    print(f"\nthe nested call's handler saw time_remaining() = {seen}")
    assert seen != "None" and 0 < float(seen) <= 3
    seen = stub.Call(testing.Request(key="relay")).key  # no deadline: none inherited
    assert seen == "None"
    server.stop(0)


def test_trailing_metadata_comes_back_with_replies_and_errors(cluster: Cluster) -> None:
    a = cluster.daemon("a")
    b = cluster.daemon("b")

    class Trailer(testing.TestServicer):  # type: ignore[misc,name-defined]
        def Call(self, request, context):  # type: ignore[no-untyped-def]
            context.set_trailing_metadata([("served-by", "trailer"), ("echo-bin", request.payload)])
            if request.key == "fail":
                context.abort(StatusCode.FAILED_PRECONDITION, "asked to fail")
            if request.key == "badkey":
                context.set_trailing_metadata([("Bad Key", "x")])
            return testing.Reply(key=request.key)

    server = libmrpc.Server(prefix=b.prefix, name="trailer")
    server.add_servicer(Trailer())
    server.start()
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="trail-client"))
    reply, call = stub.Call.with_call(testing.Request(key="k", payload=b"\x00\x01"), timeout=10)
    assert reply.key == "k" and call.code() is StatusCode.OK
    assert call.trailing_metadata() == (("served-by", "trailer"), ("echo-bin", b"\x00\x01"))
    del reply, call  # its receive-heap block goes back to the daemon
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(key="fail", payload=b"z"), timeout=10)
    assert e.value.code() is StatusCode.FAILED_PRECONDITION
    assert e.value.trailing_metadata() == (("served-by", "trailer"), ("echo-bin", b"z"))
    with pytest.raises(RpcError) as e:  # the server broke the key rules: its fault, INTERNAL
        stub.Call(testing.Request(key="badkey"), timeout=10)
    assert (
        e.value.code() is StatusCode.INTERNAL and "bad metadata with its reply" in e.value.details()
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        used = (
            next(x for x in a.apps() if x["name"] == "trail-client")["recv_heap"]["used"],
            next(x for x in b.apps() if x["name"] == "trailer")["recv_heap"]["used"],
        )
        if used == (0, 0):
            break
        time.sleep(0.1)
    assert used == (0, 0), used
    server.stop(0)


def test_grpc_parity_peer_code_details_abort_with_status_traceback(cluster: Cluster) -> None:
    import collections

    a = cluster.daemon("a")
    b = cluster.daemon("b")
    Status = collections.namedtuple("Status", "code details trailing_metadata")
    seen: dict[str, Any] = {}

    class Parity(testing.TestServicer):  # type: ignore[misc,name-defined]
        def Call(self, request, context):  # type: ignore[no-untyped-def]
            seen["peer"] = context.peer()
            context.set_code(StatusCode.OK)
            context.set_details("fine")
            seen["code"], seen["details"] = context.code(), context.details()
            if request.key == "status":
                context.abort_with_status(
                    Status(StatusCode.PERMISSION_DENIED, "no", (("why", "x"),))
                )
            return testing.Reply(key=request.key)

    server = libmrpc.Server(prefix=b.prefix, name="parity-srv")
    server.add_servicer(Parity())
    server.start()
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="parity-client"))
    assert stub.Call(testing.Request(key="k"), timeout=10).key == "k"
    print(f"\ncontext.peer() = {seen['peer']}")
    assert "parity-client" in seen["peer"] and str(os.getpid()) in seen["peer"]
    assert seen["code"] is StatusCode.OK and seen["details"] == "fine"
    fut = stub.Call.future(testing.Request(key="status"), timeout=10)
    err = fut.exception()
    assert err is not None and err.code() is StatusCode.PERMISSION_DENIED and err.details() == "no"
    assert err.trailing_metadata() == (("why", "x"),)
    tb = fut.traceback()
    assert tb is not None and hasattr(tb, "tb_frame")
    assert stub.Call.future(testing.Request(key="k"), timeout=10).traceback() is None
    server.stop(0)


def test_the_first_calls_timeout_bounds_bind_and_connect(cluster: Cluster) -> None:
    import signal
    import threading

    a = cluster.daemon("a")
    b = cluster.daemon("b")
    cluster.server(b, "--mode", "inline")
    from libmrpc._session import get_session

    get_session(a.prefix, "first-call")  # registered; no schema bound, no connection yet
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="first-call"))
    outcome: list[Any] = []

    def first() -> None:
        t0 = time.monotonic()
        try:
            stub.Call(testing.Request(key="k"), timeout=1.0)
            outcome.append(("ok", time.monotonic() - t0))
        except RpcError as e:
            outcome.append((e.code(), time.monotonic() - t0))

    os.kill(a.pid, signal.SIGSTOP)  # the daemon does not answer the bind (a slow cold compile)
    try:
        t = threading.Thread(target=first, daemon=True)
        t.start()
        t.join(10)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    print(f"\nfirst call against a stopped daemon: {outcome}")
    assert outcome and outcome[0][0] is StatusCode.DEADLINE_EXCEEDED and outcome[0][1] < 3, outcome
    # the late bind reply is dropped; the next call binds, connects and goes through
    assert stub.Call(testing.Request(key="k2", payload=b"x"), timeout=10).payload == b"x"


class Headers(testing.TestServicer):  # type: ignore[misc,name-defined]
    """Sends initial metadata as ``request.key`` asks; replies with what a second send raised."""

    def Call(self, request, context):  # type: ignore[no-untyped-def]
        key = request.key
        if key == "both":
            context.send_initial_metadata([("initial-k", "v"), ("init-bin", b"\x00\xff")])
            context.set_trailing_metadata([("trailing-k", "t")])
        elif key in ("initial", "twice"):
            context.send_initial_metadata((("only", "initial"),))
        elif key == "abort":
            context.send_initial_metadata([("before", "abort")])
            context.set_trailing_metadata([("why", "abort")])
            context.abort(StatusCode.NOT_FOUND, "asked to abort")
        elif key == "raise":
            context.send_initial_metadata([("before", "raise")])
            raise ValueError("asked to raise")
        elif key == "badkey":
            context.send_initial_metadata([("Bad Key", "x")])
        elif key == "reserved":
            context.send_initial_metadata([("grpc-status", "0")])
        elif key == "big":  # under the limit each, over it together
            context.send_initial_metadata([("big-bin", b"i" * 5000)])
            context.set_trailing_metadata([("big-bin", b"t" * 5000)])
        if key == "twice":
            try:
                context.send_initial_metadata([("again", "x")])
            except ValueError as e:
                return testing.Reply(key=f"ValueError: {e}")
        return testing.Reply(key=key)


class AsyncHeaders(testing.TestServicer):  # type: ignore[misc,name-defined]
    """An ``async def`` handler written as for grpc.aio: ``await context.send_initial_metadata``."""

    async def Call(self, request, context):  # type: ignore[no-untyped-def]
        await context.send_initial_metadata([("async-k", request.key)])
        context.set_trailing_metadata([("async-t", "t")])
        if request.key == "abort":
            context.abort(StatusCode.FAILED_PRECONDITION, "asked to abort")
        try:
            await context.send_initial_metadata([("again", "x")])
        except ValueError:
            return testing.Reply(key="second send refused")
        return testing.Reply(key="second send accepted")


def headers_setup(cluster: Cluster, servicer: Any, name: str) -> tuple[Any, Any, Any, Any]:
    a = cluster.daemon("a")
    b = cluster.daemon("b")
    server = libmrpc.Server(prefix=b.prefix, name=name)
    server.add_servicer(servicer)
    server.start()
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name=f"{name}-client"))
    return a, b, stub, server


def both_heaps_settle(a: Any, b: Any, client: str, server: str) -> tuple[int, int]:
    deadline = time.monotonic() + 5
    while True:
        used = (
            next(x for x in a.apps() if x["name"] == client)["recv_heap"]["used"],
            next(x for x in b.apps() if x["name"] == server)["recv_heap"]["used"],
        )
        if used == (0, 0) or time.monotonic() > deadline:
            return used
        time.sleep(0.1)


def test_initial_metadata_comes_back_sync_future_and_aio(cluster: Cluster) -> None:
    import asyncio

    a, b, stub, server = headers_setup(cluster, Headers(), "headers")
    initial = (("initial-k", "v"), ("init-bin", b"\x00\xff"))
    reply, call = stub.Call.with_call(testing.Request(key="both"), timeout=10)
    assert reply.key == "both" and call.code() is StatusCode.OK
    assert call.initial_metadata() == initial, call.initial_metadata()
    assert call.trailing_metadata() == (("trailing-k", "t"),)
    reply, call = stub.Call.with_call(testing.Request(key="initial"), timeout=10)
    assert call.initial_metadata() == (("only", "initial"),) and call.trailing_metadata() == ()
    reply, call = stub.Call.with_call(testing.Request(key="none"), timeout=10)
    assert call.initial_metadata() == () and call.trailing_metadata() == ()
    fut = stub.Call.future(testing.Request(key="both"), timeout=10)
    assert fut.initial_metadata() == initial and fut.trailing_metadata() == (("trailing-k", "t"),)
    assert fut.result().key == "both"

    async def aio() -> tuple[Any, ...]:
        reply, call = await stub.Call.aio_with_call(testing.Request(key="both"), timeout=10)
        return (
            reply.key,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.code(),
            await call.details(),
        )

    got = asyncio.run(aio())
    print(f"\naio_with_call: {got}")
    assert got == ("both", initial, (("trailing-k", "t"),), StatusCode.OK, "")
    # the second send_initial_metadata raises as in grpcio; the first one stands
    reply, call = stub.Call.with_call(testing.Request(key="twice"), timeout=10)
    assert reply.key.startswith("ValueError: initial metadata no longer allowed"), reply.key
    assert call.initial_metadata() == (("only", "initial"),)
    del reply, call, fut  # their receive-heap blocks go back to the daemon
    assert both_heaps_settle(a, b, "headers-client", "headers") == (0, 0)
    server.stop(0)


def test_initial_metadata_arrives_with_errors(cluster: Cluster) -> None:
    import asyncio

    _a, _b, stub, server = headers_setup(cluster, Headers(), "headers-err")
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(key="abort"), timeout=10)
    assert e.value.code() is StatusCode.NOT_FOUND and e.value.details() == "asked to abort"
    assert e.value.initial_metadata() == (("before", "abort"),)
    assert e.value.trailing_metadata() == (("why", "abort"),)
    err = stub.Call.future(testing.Request(key="raise"), timeout=10).exception()
    assert err is not None and err.code() is StatusCode.UNKNOWN, err
    assert err.initial_metadata() == (("before", "raise"),) and err.trailing_metadata() == ()

    async def aio() -> RpcError:
        try:
            await stub.Call.aio_with_call(testing.Request(key="abort"), timeout=10)
        except RpcError as e:
            return e
        raise AssertionError("the call succeeded")

    err = asyncio.run(aio())
    assert err.code() is StatusCode.NOT_FOUND and err.initial_metadata() == (("before", "abort"),)
    server.stop(0)


def test_bad_initial_metadata_fails_only_that_call(cluster: Cluster) -> None:
    a, b, stub, server = headers_setup(cluster, Headers(), "headers-bad")
    for key, code, why in (
        ("badkey", StatusCode.INTERNAL, "initial metadata: metadata key 'Bad Key' is invalid"),
        ("reserved", StatusCode.INTERNAL, "is reserved"),
        ("big", StatusCode.RESOURCE_EXHAUSTED, "exceeds the limit of 8192 bytes"),
    ):
        with pytest.raises(RpcError) as e:
            stub.Call(testing.Request(key=key), timeout=10)
        print(f"\n{key}: {e.value.code().name}: {e.value.details()}")
        assert e.value.code() is code, e.value
        assert why in e.value.details() and "headers-bad" in e.value.details(), e.value.details()
        assert e.value.initial_metadata() == ()  # the refused metadata is not delivered
    reply, call = stub.Call.with_call(testing.Request(key="both"), timeout=10)  # still serving
    assert call.initial_metadata()[0] == ("initial-k", "v")
    del reply, call
    assert both_heaps_settle(a, b, "headers-bad-client", "headers-bad") == (0, 0)
    server.stop(0)


def test_async_handlers_await_send_initial_metadata(cluster: Cluster) -> None:
    import asyncio

    _a, _b, stub, server = headers_setup(cluster, AsyncHeaders(), "headers-async")
    reply, call = stub.Call.with_call(testing.Request(key="k"), timeout=10)
    assert reply.key == "second send refused"
    assert call.initial_metadata() == (("async-k", "k"),)
    assert call.trailing_metadata() == (("async-t", "t"),)

    async def aio() -> RpcError:
        try:
            await stub.Call.aio(testing.Request(key="abort"), timeout=10)
        except RpcError as e:
            return e
        raise AssertionError("the call succeeded")

    err = asyncio.run(aio())
    assert err.code() is StatusCode.FAILED_PRECONDITION
    assert err.initial_metadata() == (("async-k", "abort"),)
    assert err.trailing_metadata() == (("async-t", "t"),)
    server.stop(0)
