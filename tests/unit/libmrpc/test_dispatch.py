"""The one dispatcher both the server and libmrpc.testing run handlers through."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import libmrpc
from libmrpc._dispatch import Handler, ServicerContext, handlers_of, run_async, run_sync
from libmrpc._session import CALL_DEADLINE
from libmrpc.status import RpcError, StatusCode

ROOT = Path(__file__).resolve().parents[3]
testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
CALL = next(m for m in testing._SCHEMA_INFO.METHODS if m.name == "Call")


def _handler(fn: Any) -> Handler:
    return Handler.for_method(fn, testing._SCHEMA_INFO, CALL)


def _ctx(deadline_ns: int = 0) -> ServicerContext:
    return ServicerContext(CALL.path, deadline_ns)


def test_a_reply_is_ok_and_callbacks_have_run() -> None:
    ran: list[int] = []

    def fn(request: Any, context: ServicerContext) -> Any:
        context.add_callback(lambda: ran.append(1))
        context.set_trailing_metadata([("k", "v")])
        return testing.Reply(key=request.key)

    ctx = _ctx()
    out = run_sync(_handler(fn), testing.Request(key="x"), ctx)
    assert out.code is StatusCode.OK and out.reply.key == "x" and out.trailing == (("k", "v"),)
    assert ran == [1] and not ctx.add_callback(lambda: None)  # the call has ended


@pytest.mark.parametrize(
    "body, code, details",
    [
        (lambda c: c.abort(StatusCode.NOT_FOUND, "no key"), StatusCode.NOT_FOUND, "no key"),
        (lambda c: 1 / 0, StatusCode.UNKNOWN, "Exception calling application: ZeroDivisionError"),
        (lambda c: testing.Request(), StatusCode.INTERNAL, "returned Request, expected"),
        (
            lambda c: (c.set_code(StatusCode.ABORTED), c.set_details("later"), testing.Reply())[2],
            StatusCode.ABORTED,
            "later",
        ),
    ],
    ids=["abort", "exception", "wrong-type", "set_code"],
)
def test_every_failure_becomes_a_status(body: Any, code: StatusCode, details: str) -> None:
    out = run_sync(_handler(lambda request, context: body(context)), testing.Request(), _ctx())
    assert out.code is code and details in out.details and out.reply is None
    err = out.error()
    assert isinstance(err, RpcError) and err.code() is code


def test_the_deadline_is_inherited_by_nested_calls_and_reset_after() -> None:
    deadline = time.monotonic_ns() + 10**9
    seen: list[int | None] = []
    h = _handler(lambda request: seen.append(CALL_DEADLINE.get()) or testing.Reply())
    assert not h.takes_context
    before = CALL_DEADLINE.get()
    assert run_sync(h, testing.Request(), _ctx(deadline)).code is StatusCode.OK
    assert seen == [deadline] and CALL_DEADLINE.get() == before


def test_async_handlers_run_the_same_way() -> None:
    async def fn(request: Any, context: ServicerContext) -> Any:
        await asyncio.sleep(0)
        context.set_trailing_metadata([("after", "await")])
        context.abort(StatusCode.PERMISSION_DENIED, "no")

    h = _handler(fn)
    assert h.is_async
    out = asyncio.run(run_async(h, testing.Request(), _ctx()))
    assert out.code is StatusCode.PERMISSION_DENIED and out.trailing == (("after", "await"),)
    assert out.error().trailing_metadata() == (("after", "await"),)


def test_handlers_of_takes_only_overridden_methods() -> None:
    class Partial(testing.TestServicer):
        def Call(self, request: Any) -> Any:
            return testing.Reply()

    schema, service, handlers = handlers_of(Partial())
    assert schema is testing._SCHEMA_INFO and service.endswith("Test")
    assert list(handlers) == [CALL.id] and handlers[CALL.id].path == CALL.path
    with pytest.raises(TypeError, match="int does not derive from a generated"):
        handlers_of(3)
