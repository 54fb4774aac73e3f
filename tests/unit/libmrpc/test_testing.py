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
