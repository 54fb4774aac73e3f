"""libmrpc.testing: handlers tested in memory, through the real marshallers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import libmrpc
from libmrpc import RpcError, StatusCode
from libmrpc.testing import channel_for
from tests.unit.libmrpc.wire.test_marshal_property import ALLTYPES, message_strategy

ROOT = Path(__file__).resolve().parents[3]
testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
alltypes = libmrpc.load_proto(ROOT / "schemas" / "alltypes.proto")


class Servicer(testing.TestServicer):
    def Call(self, request, context):
        if request.fail:
            raise ValueError(request.fail)
        if request.key == "abort":
            context.abort(StatusCode.NOT_FOUND, "no such key")
        assert request.payload.readonly  # the handler sees a received, read-only message
        with pytest.raises(TypeError):
            request.key = "x"
        return testing.Reply(
            payload=request.payload, request_size=len(request.payload), key=request.key
        )


def test_sync_future_and_aio_calls() -> None:
    with channel_for([Servicer()]) as channel:
        stub = testing.TestStub(channel)
        reply = stub.Call(testing.Request(payload=b"hi", key="k"), timeout=1)
        assert bytes(reply.payload) == b"hi" and reply.request_size == 2 and reply.key == "k"
        assert reply.payload.readonly
        assert bytes(stub.Call.future(testing.Request(payload=b"f")).result().payload) == b"f"

        async def go() -> bytes:
            return bytes((await stub.Call.aio(testing.Request(payload=b"a"))).payload)

        assert asyncio.run(go()) == b"a"


def test_status_codes_match_the_real_path() -> None:
    stub = testing.TestStub(channel_for([Servicer()]))
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(fail="boom"))
    assert e.value.code() is StatusCode.UNKNOWN and "boom" in e.value.details()
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(key="abort"))
    assert e.value.code() is StatusCode.NOT_FOUND
    with pytest.raises(RpcError) as e:
        stub.NotServed(testing.Request())
    assert e.value.code() is StatusCode.UNIMPLEMENTED


class AllTypesEcho(alltypes.AllTypesServiceServicer):
    async def Roundtrip(self, request, context):
        await asyncio.sleep(0)
        return request  # a received message is copied back, as in production


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(pb=message_strategy(ALLTYPES, depth=2))
def test_async_handlers_and_every_field_type(pb) -> None:
    stub = alltypes.AllTypesServiceStub(channel_for([AllTypesEcho()]))
    assert stub.Roundtrip(alltypes.AllTypes.from_pb(pb)).to_pb() == pb


class Headers(testing.TestServicer):
    """Sends initial and trailing metadata; ``request.key`` picks how the call ends."""

    def __init__(self) -> None:
        self.context = None

    def Call(self, request, context):
        self.context = context
        context.send_initial_metadata([("initial-k", request.key), ("i-bin", b"\x00")])
        context.set_trailing_metadata([("trailing-k", "t")])
        if request.key == "abort":
            context.abort(StatusCode.NOT_FOUND, "asked to abort")
        if request.key == "raise":
            raise ValueError("asked to raise")
        with pytest.raises(ValueError, match="no longer allowed"):
            context.send_initial_metadata([("again", "x")])
        return testing.Reply(key=request.key)


class AsyncHeaders(testing.TestServicer):
    async def Call(self, request, context):
        await context.send_initial_metadata([("async-k", request.key)])
        if request.key == "bad":
            context.set_trailing_metadata([("Bad", "x")])
        return testing.Reply(key=request.key)


def test_initial_metadata_comes_back_in_memory_as_through_mrpcd() -> None:
    servicer = Headers()
    stub = testing.TestStub(channel_for([servicer]))
    reply, call = stub.Call.with_call(testing.Request(key="k"))
    assert reply.key == "k" and call.initial_metadata() == (("initial-k", "k"), ("i-bin", b"\x00"))
    assert call.trailing_metadata() == (("trailing-k", "t"),)
    with pytest.raises(ValueError, match="no longer allowed"):  # the call has ended
        servicer.context.send_initial_metadata([("late", "x")])
    fut = stub.Call.future(testing.Request(key="f"))
    assert fut.initial_metadata()[0] == ("initial-k", "f")
    assert fut.trailing_metadata() == (("trailing-k", "t"),)

    async def aio() -> tuple[object, ...]:
        _, call = await stub.Call.aio_with_call(testing.Request(key="a"))
        return await call.initial_metadata(), await call.code()

    assert asyncio.run(aio()) == ((("initial-k", "a"), ("i-bin", b"\x00")), StatusCode.OK)
    for key, code in (("abort", StatusCode.NOT_FOUND), ("raise", StatusCode.UNKNOWN)):
        with pytest.raises(RpcError) as e:
            stub.Call(testing.Request(key=key))
        assert e.value.code() is code
        assert e.value.initial_metadata()[0] == ("initial-k", key)
        assert e.value.trailing_metadata() == (("trailing-k", "t"),)


def test_async_handlers_and_bad_reply_metadata_in_memory() -> None:
    stub = testing.TestStub(channel_for([AsyncHeaders()]))
    _, call = stub.Call.with_call(testing.Request(key="k"))
    assert call.initial_metadata() == (("async-k", "k"),)
    with pytest.raises(RpcError) as e:  # mrpcd's checks: the server's fault is INTERNAL
        stub.Call(testing.Request(key="bad"))
    assert e.value.code() is StatusCode.INTERNAL and "'Bad' is invalid" in e.value.details()
    assert e.value.initial_metadata() == ()


def test_send_initial_metadata_rules_match_grpcio() -> None:
    from libmrpc.server import ServicerContext

    ctx = ServicerContext("/t.T/M", 0)
    with pytest.raises(RpcError) as e:
        ctx.send_initial_metadata([("k", 1)])
    assert e.value.code() is StatusCode.INVALID_ARGUMENT
    with pytest.raises(RpcError) as e:
        ctx.send_initial_metadata(None)
    assert e.value.code() is StatusCode.INVALID_ARGUMENT
    assert ctx._initial is None  # nothing recorded: a good send still works
    sent = ctx.send_initial_metadata(iter([("k", "v")]))
    assert ctx._initial == (("k", "v"),)
    assert asyncio.run(_await(sent)) is None  # awaitable, as grpc.aio's
    with pytest.raises(ValueError, match="no longer allowed"):
        ctx.send_initial_metadata([("k", "v")])
    cancelled = ServicerContext("/t.T/M", 0)
    cancelled._cancelled = True
    with pytest.raises(RpcError) as e:
        cancelled.send_initial_metadata([("k", "v")])
    assert e.value.code() is StatusCode.CANCELLED


async def _await(aw: object) -> object:
    return await aw  # type: ignore[misc]


class Contextual(testing.TestServicer):
    """Uses the context the way the server's dispatcher serves it."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    async def Call(self, request, context):
        context.add_callback(lambda: self.ended.append(request.key))
        await asyncio.sleep(0)
        context.set_trailing_metadata([("x-key", request.key)])
        if request.fail:
            context.abort(StatusCode.FAILED_PRECONDITION, request.fail)
        remaining = context.time_remaining()
        return testing.Reply(key=f"{remaining is not None and 0 < remaining <= 5}")


def test_async_handlers_get_the_servers_context_semantics() -> None:
    """Trailing metadata set after an await, callbacks and deadlines, as on the server."""
    servicer = Contextual()
    stub = testing.TestStub(channel_for([servicer]))
    reply, call = stub.Call.with_call(testing.Request(key="a"), timeout=5)
    assert reply.key == "True"
    assert call.trailing_metadata() == (("x-key", "a"),)
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(key="b", fail="not now"))
    assert e.value.code() is StatusCode.FAILED_PRECONDITION
    assert e.value.trailing_metadata() == (("x-key", "b"),)  # sent with the error too
    assert servicer.ended == ["a", "b"]  # add_callback ran when each call ended


def test_a_wrong_reply_type_is_internal_as_on_the_server() -> None:
    class Wrong(testing.TestServicer):
        def Call(self, request, context):
            return testing.Request()

    with pytest.raises(RpcError) as e:
        testing.TestStub(channel_for([Wrong()])).Call(testing.Request())
    assert e.value.code() is StatusCode.INTERNAL
    assert "returned Request, expected mrpctest.Reply" in e.value.details()


def test_channel_for_refuses_what_is_not_a_servicer() -> None:
    with pytest.raises(TypeError, match="does not derive from a generated"):
        channel_for([object()])
