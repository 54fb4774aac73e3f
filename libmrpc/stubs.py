"""gRPC-shaped stub and servicer classes built from a generated schema module.

A generated module ends with ``install_services(globals())``, which adds for
every service ``S``: ``SStub(channel)`` with one callable per method
(``stub.M(req, timeout=...)``, ``stub.M.with_call(req)``, ``stub.M.future(req)``,
``await stub.M.aio(req)``, ``await stub.M.aio_with_call(req)``),
``SServicer`` (a base class whose methods answer UNIMPLEMENTED) and
``add_SServicer_to_server(servicer, server)``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

from libmrpc.status import RpcError, StatusCode
from libmrpc.wire import metadata as md


@dataclass(frozen=True)
class SchemaInfo:
    """What the runtime needs of a generated module (its globals)."""

    SCHEMA_HASH: str
    TEXTS: dict[str, str]
    METHODS: list[Any]
    MESSAGES: dict[str, Any]
    SERVICES: dict[str, tuple[int, ...]]
    MARSHAL: dict[str, Any]
    VALIDATE: dict[str, Any]

    @classmethod
    def of(cls, ns: dict[str, Any]) -> SchemaInfo:
        return cls(
            ns["SCHEMA_HASH"],
            ns["TEXTS"],
            ns["METHODS"],
            ns["MESSAGES"],
            ns["SERVICES"],
            ns["MARSHAL"],
            ns["VALIDATE"],
        )


class CallFuture:
    """``stub.M.future(req)``: a grpc.Future-like handle on one call."""

    def __init__(self, call: Any, timeout: float | None, session: Any = None) -> None:
        self._call = call
        self._timeout = timeout
        self._session = session

    def done(self) -> bool:
        return self._call.done

    def running(self) -> bool:
        return not self._call.done

    def cancelled(self) -> bool:
        return bool(self._call.cancelled)

    def cancel(self) -> bool:
        """Cancel the call on both daemons and on the server (its handler's context turns
        inactive); ``result()`` then raises CANCELLED. False if it already completed."""
        if self._session is None:
            return False
        return bool(self._session.cancel(self._call))

    def result(self, timeout: float | None = None) -> Any:
        wait = self._timeout if timeout is None else timeout
        if not self._call.wait(wait):
            if timeout is not None and (self._timeout is None or timeout < self._timeout):
                raise TimeoutError(f"{self._call.method} not done after {timeout}s")
            self._call.abandoned = True  # already a background call: the reader reaps it
            raise RpcError(
                StatusCode.DEADLINE_EXCEEDED,
                f"{self._call.method}: deadline of {self._timeout}s exceeded",
            )
        if self._call.error is not None:
            raise self._call.error
        return self._call.result

    def traceback(self, timeout: float | None = None) -> Any:
        """The traceback of the call's error (None when it succeeded)."""
        error = self.exception(timeout)
        if error is None:
            return None
        try:
            raise error
        except RpcError:
            return sys.exc_info()[2]

    def exception(self, timeout: float | None = None) -> RpcError | None:
        try:
            self.result(timeout)
        except RpcError as e:
            return e
        return None

    def add_done_callback(self, fn: Any) -> None:
        self._call.add_callback(lambda _c: fn(self))  # exactly once, even racing the completion

    def initial_metadata(self) -> md.Metadata:
        """The server's initial metadata (``context.send_initial_metadata``). It arrives
        with the reply, so this waits for the call to complete (up to its timeout);
        empty when the server sent none or the call has not completed."""
        self._call.wait(self._timeout)
        return md.split(self._call.trailing)[0]

    def trailing_metadata(self) -> md.Metadata:
        """The server's trailing metadata; waits like ``initial_metadata()``."""
        self._call.wait(self._timeout)
        return md.split(self._call.trailing)[1]


class CallInfo:
    """The ``call`` of ``stub.M.with_call``: the outcome and the server's metadata.

    mrpc carries the server's initial metadata with the reply (a unary call has
    one response), so both kinds are there once the call returned.
    """

    def __init__(self, call: Any) -> None:
        self._call = call

    def trailing_metadata(self) -> md.Metadata:
        """What the handler passed to ``context.set_trailing_metadata()``."""
        return md.split(self._call.trailing)[1]

    def initial_metadata(self) -> md.Metadata:
        """What the handler passed to ``context.send_initial_metadata()``."""
        return md.split(self._call.trailing)[0]

    def code(self) -> StatusCode:
        return StatusCode.OK if self._call.error is None else self._call.error.code()

    def details(self) -> str:
        return "" if self._call.error is None else self._call.error.details()


class AioCallInfo:
    """The ``call`` of ``await stub.M.aio_with_call``, shaped like a grpc.aio call:
    ``await call.initial_metadata()``, ``trailing_metadata()``, ``code()``, ``details()``
    (all complete at once: the call has returned)."""

    def __init__(self, call: Any) -> None:
        self._info = CallInfo(call)

    async def initial_metadata(self) -> md.Metadata:
        return self._info.initial_metadata()

    async def trailing_metadata(self) -> md.Metadata:
        return self._info.trailing_metadata()

    async def code(self) -> StatusCode:
        return self._info.code()

    async def details(self) -> str:
        return self._info.details()


class UnaryUnaryMultiCallable:
    """``stub.Method``: call it, or use ``.future()`` / ``.aio()``."""

    __slots__ = ("_channel", "_conn", "_method", "_request_cls", "_response_cls", "_schema")

    def __init__(self, channel: Any, schema: SchemaInfo, method: Any) -> None:
        self._channel = channel
        self._schema = schema
        self._method = method
        self._request_cls = schema.MESSAGES[method.request]
        self._response_cls = schema.MESSAGES[method.response]
        self._conn: tuple[Any, int] | None = None

    def _start(
        self, request: Any, timeout: float | None, background: bool = False, metadata: Any = None
    ) -> Any:
        if not isinstance(request, self._request_cls):
            raise TypeError(
                f"{self._method.path} takes {self._method.request}, got {type(request).__name__}"
            )
        session = self._channel._session()
        conn = self._conn
        if conn is None or conn[0] is not session:  # the first call: its timeout bounds these too
            t0 = time.monotonic()
            slot = session.bind(self._schema, timeout)
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
            conn = self._conn = (session, session.open_conn(self._channel.target, slot, left))
            if timeout is not None:
                timeout = max(0.001, timeout - (time.monotonic() - t0))
        return session.start_call(
            conn[1],
            self._method.id,
            self._method.path,
            request,
            self._response_cls,
            timeout,
            background,
            metadata,
        )

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        wait_for_ready: Any = None,
    ) -> Any:
        return self._blocking(request, timeout, metadata).result

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        wait_for_ready: Any = None,
    ) -> tuple[Any, CallInfo]:
        """Like calling the stub; returns ``(reply, call)`` where ``call`` gives the
        server's ``initial_metadata()``, ``trailing_metadata()``, ``code()`` and
        ``details()``. A failed call raises RpcError, which carries both metadata too."""
        call = self._blocking(request, timeout, metadata)
        return call.result, CallInfo(call)

    def _blocking(self, request: Any, timeout: float | None, metadata: Any) -> Any:
        call = self._start(request, timeout, metadata=metadata)
        session = self._channel._session()
        if not session.wait_call(call, timeout):
            session.abandon(call)
            if call.done:  # completed while giving up
                if call.error is not None:
                    raise call.error
                return call
            raise RpcError(
                StatusCode.DEADLINE_EXCEEDED,
                f"{self._method.path}: deadline of {timeout}s exceeded",
            )
        if call.error is not None:
            raise call.error
        return call

    def future(
        self, request: Any, timeout: float | None = None, metadata: Any = None
    ) -> CallFuture:
        return CallFuture(
            self._start(request, timeout, background=True, metadata=metadata),
            timeout,
            self._channel._session(),
        )

    async def aio(self, request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        session = self._channel._session()
        call = self._start(
            request, timeout, background=not session.attach_loop(loop), metadata=metadata
        )
        session.add_aio(loop, fut, call)
        try:
            return await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
        except asyncio.CancelledError:
            self._aio_cancelled(call)
            raise
        except TimeoutError:
            raise self._aio_timed_out(call, timeout) from None

    async def aio_with_call(
        self, request: Any, timeout: float | None = None, metadata: Any = None
    ) -> tuple[Any, AioCallInfo]:
        """Like ``await stub.M.aio(req)``; returns ``(reply, call)`` where ``call`` gives
        ``await call.initial_metadata()`` and ``await call.trailing_metadata()`` as in
        grpc.aio. A failed call raises RpcError, which carries both metadata too."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        session = self._channel._session()
        call = self._start(
            request, timeout, background=not session.attach_loop(loop), metadata=metadata
        )
        session.add_aio(loop, fut, call)
        try:
            reply = await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
        except asyncio.CancelledError:
            self._aio_cancelled(call)
            raise
        except TimeoutError:
            raise self._aio_timed_out(call, timeout) from None
        return reply, AioCallInfo(call)

    def _aio_cancelled(self, call: Any) -> None:
        session = self._channel._session()
        session.cancel(call)  # the task was cancelled: so is the call
        session.abandon(call)  # its CANCELLED completion is reaped by the reader thread

    def _aio_timed_out(self, call: Any, timeout: float | None) -> RpcError:
        self._channel._session().abandon(call)
        return RpcError(
            StatusCode.DEADLINE_EXCEEDED, f"{self._method.path}: deadline of {timeout}s exceeded"
        )


def _make_stub(schema: SchemaInfo, service: str) -> type:
    methods = [
        schema.METHODS[i]
        for i in schema.SERVICES[service]
        if not (schema.METHODS[i].client_streaming or schema.METHODS[i].server_streaming)
    ]

    def __init__(self: Any, channel: Any) -> None:
        for m in methods:
            setattr(self, m.name, UnaryUnaryMultiCallable(channel, schema, m))

    return type(
        f"{service.rsplit('.', 1)[-1]}Stub",
        (),
        {"__init__": __init__, "__doc__": f"Client stub for {service}.", "_MRPC_SERVICE": service},
    )


def _unimplemented(name: str, path: str) -> Any:
    def method(self: Any, request: Any, context: Any) -> Any:
        raise RpcError(StatusCode.UNIMPLEMENTED, f"method {path} is not implemented by this server")

    method.__name__ = name
    method._mrpc_unimplemented = True  # type: ignore[attr-defined]
    return method


def _make_servicer(schema: SchemaInfo, service: str) -> type:
    attrs: dict[str, Any] = {
        "_MRPC_SCHEMA": schema,
        "_MRPC_SERVICE": service,
        "__doc__": f"Base class for {service} servers: override its methods.",
    }
    for i in schema.SERVICES[service]:
        m = schema.METHODS[i]
        attrs[m.name] = _unimplemented(m.name, m.path)
    return type(f"{service.rsplit('.', 1)[-1]}Servicer", (), attrs)


def install_services(namespace: dict[str, Any]) -> None:
    """Add ``<Service>Stub``, ``<Service>Servicer`` and ``add_<Service>Servicer_to_server``."""
    schema = SchemaInfo.of(namespace)
    namespace["_SCHEMA_INFO"] = schema
    for service in schema.SERVICES:
        short = service.rsplit(".", 1)[-1]
        namespace[f"{short}Stub"] = _make_stub(schema, service)
        servicer = namespace[f"{short}Servicer"] = _make_servicer(schema, service)

        def add(svc: Any, server: Any, _cls: type = servicer) -> None:
            server.add_servicer(svc)

        namespace[f"add_{short}Servicer_to_server"] = add
