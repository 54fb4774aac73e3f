"""Test your handlers without daemons: an in-memory channel (like grpclib.testing).

    from libmrpc.testing import channel_for

    def test_echo():
        with channel_for([MyEcho()]) as channel:
            stub = echo.EchoStub(channel)
            assert bytes(stub.Echo(echo.EchoRequest(payload=b"hi")).payload) == b"hi"

Calls go through the same generated stubs, and each request and reply is
marshalled and validated by the schema's real marshallers (as the daemons
would), then handed over as a read-only received message — so a handler sees
exactly what it would see in production, and a message that would not survive
the wire fails here too. Handler errors become ``RpcError`` with the same
status codes as through mrpcd. Sync, ``.future()`` and ``.aio`` calls work;
``async def`` handlers are run to completion. Metadata is checked as mrpcd
checks it, both ways; the handler's initial and trailing metadata come back
through ``with_call``, ``future``, ``aio_with_call`` and ``RpcError``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, Self

from libmrpc._dispatch import (
    Handler,
    Outcome,
    ServicerContext,
    handlers_of,
    run_async,
    run_sync,
)
from libmrpc._heap import Heap
from libmrpc._message import ReadOnlyOwner
from libmrpc._session import Call
from libmrpc.status import RpcError, StatusCode
from libmrpc.stubs import SchemaInfo
from libmrpc.wire import metadata as md
from libmrpc.wire.errors import WireError

MAX_MESSAGE = 64 << 20


def _wire(schema: SchemaInfo, type_name: str, msg: Any) -> Any:
    """``msg`` as the receiving side would see it: marshalled, validated, read-only."""
    heap = msg._owner.heap if hasattr(msg._owner, "heap") else None
    if heap is None:  # a received (read-only) message: copy it into a scratch heap first
        heap = Heap.private(max(1 << 20, 4 * MAX_MESSAGE // 64))
        msg = schema.MESSAGES[type_name].from_pb(msg.to_pb(), heap=heap)
    head, segs = schema.MARSHAL[type_name](heap.buf, msg._off, sys.maxsize, MAX_MESSAGE)
    image = bytes(head) + b"".join(bytes(s) for s in segs)
    view = memoryview(image)
    schema.VALIDATE[type_name](view)
    return schema.MESSAGES[type_name]._from_image(view, 0, ReadOnlyOwner(image))


class _Session:
    """Stands in for libmrpc._session.Session: answers calls in the caller's thread."""

    def __init__(self, servicers: Iterable[Any]) -> None:
        self.handlers: dict[tuple[str, int], Handler] = {}
        self.closed = False
        for servicer in servicers:
            schema, _service, handlers = handlers_of(servicer)
            for mid, h in handlers.items():
                self.handlers[(schema.SCHEMA_HASH, mid)] = h
        self._schemas: dict[int, SchemaInfo] = {}
        self._ids = iter(range(1, sys.maxsize))

    def bind(self, schema: SchemaInfo, timeout: float | None = None) -> int:
        slot = len(self._schemas)
        for k, s in self._schemas.items():
            if s is schema:
                return k
        self._schemas[slot] = schema
        return slot

    def open_conn(self, target: str, slot: int, timeout: float | None = None) -> int:
        return slot

    def start_call(
        self,
        conn: int,
        method_id: int,
        path: str,
        request: Any,
        response_cls: Any,
        timeout: float | None,
        background: bool = False,
        metadata: Any = None,
    ) -> Call:
        schema = self._schemas[conn]
        method = schema.METHODS[method_id]
        call = Call(next(self._ids), None, response_cls, path)
        deadline_ns = time.monotonic_ns() + int(timeout * 1e9) if timeout is not None else 0
        try:
            received = _wire(schema, method.request, request)
            h = self.handlers.get((schema.SCHEMA_HASH, method_id))
            if h is None:
                raise RpcError(
                    StatusCode.UNIMPLEMENTED, f"method {path} is not implemented by this server"
                )
            try:  # the checks mrpcd makes
                sent = md.decode(md.encode(metadata or ()))
            except md.MetadataError as e:
                raise RpcError(e.status, f"call to {path}: {e}") from None
            ctx = ServicerContext(path, deadline_ns, None, sent)
            outcome = (
                _run(run_async(h, received, ctx)) if h.is_async else run_sync(h, received, ctx)
            )
            call.trailing = _reply_metadata(path, outcome)
            if outcome.code is not StatusCode.OK:
                raise RpcError(outcome.code, outcome.details)
            call.finish(_wire(schema, method.response, outcome.reply), None)
        except RpcError as e:
            call.finish(None, _with_metadata(e, call.trailing))
        except WireError as e:
            call.finish(None, RpcError(e.status, f"{path}: {e}"))
        except Exception as e:  # noqa: BLE001 - a failure outside the handler, as through mrpcd
            call.finish(None, RpcError(StatusCode.UNKNOWN, f"Exception calling application: {e!r}"))
        return call

    def wait_call(self, call: Call, timeout: float | None) -> bool:
        return call.done

    def abandon(self, call: Call) -> None:
        call.abandoned = True

    def cancel(self, call: Call) -> bool:
        return False  # in memory, every call has completed when it returns

    def attach_loop(self, loop: Any) -> bool:
        return True

    def add_aio(self, loop: Any, fut: Any, call: Call) -> None:
        if call.error is not None:
            fut.set_exception(call.error)
        else:
            fut.set_result(call.result)


def _reply_metadata(path: str, outcome: Outcome) -> md.Metadata:
    """The handler's initial and trailing metadata after mrpcd's checks (a break fails
    the call: RESOURCE_EXHAUSTED when too large, else INTERNAL, as through mrpcd)."""
    if not outcome.trailing and not outcome.initial:
        return ()
    try:
        return md.decode(md.encode(outcome.trailing or (), outcome.initial or ()))
    except md.MetadataError as e:
        code = e.status if e.status is StatusCode.RESOURCE_EXHAUSTED else StatusCode.INTERNAL
        raise RpcError(
            code, f"handler of {path} returned bad metadata with its reply: {e}"
        ) from None


def _with_metadata(err: RpcError, metadata: md.Metadata) -> RpcError:
    if metadata:
        err._initial, err._trailing = md.split(metadata)  # type: ignore[attr-defined]
    return err


def _run(coro: Any) -> Any:
    """Run an async handler to completion, also from inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(r=asyncio.run(coro)))
    t.start()
    t.join()
    return box["r"]


class TestChannel:
    """A channel whose calls are answered in memory by the given servicers."""

    __test__ = False  # not a pytest test class

    def __init__(self, servicers: Iterable[Any]) -> None:
        self.target = "in-memory"
        self._fake = _Session(servicers)

    def _session(self) -> Any:
        return self._fake

    def close(self) -> None:
        self._fake.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def channel_for(servicers: Iterable[Any]) -> TestChannel:
    """An in-memory channel serving ``servicers`` (generated ``<Service>Servicer`` subclasses)."""
    return TestChannel(servicers)
