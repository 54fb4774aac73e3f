"""Running one request's handler: shared by :class:`libmrpc.server.Server` and
:mod:`libmrpc.testing`, so a handler behaves the same in production and in tests.

How this works: :func:`handlers_of` finds the methods a servicer overrides and
wraps each in a :class:`Handler` (the function, its method's path and message
classes, sync or async, with or without ``context``). :func:`run_sync` /
:func:`run_async` run it with a :class:`ServicerContext`; nested calls inherit the
caller's deadline. Whatever happened becomes an :class:`Outcome`: the reply, or the
status an exception, ``context.abort()`` or ``context.set_code()`` stands for, with
the trailing metadata the handler set. The context's callbacks (``add_callback``)
have run when the outcome is returned; sending it is the caller's business.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from libmrpc._session import CALL_DEADLINE
from libmrpc.status import RpcError, StatusCode
from libmrpc.wire import metadata as md

if TYPE_CHECKING:
    from libmrpc._session import Session
    from libmrpc.stubs import SchemaInfo

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, "str | bytes"], ...]


class ServicerContext:
    """The ``context`` argument of handlers (the grpc.ServicerContext subset that applies)."""

    __slots__ = (
        "_callbacks",
        "_cancelled",
        "_code",
        "_deadline_ns",
        "_details",
        "_initial",
        "_metadata",
        "_method",
        "_session",
        "_token",
        "_trailing",
    )

    def __init__(
        self,
        method: str,
        deadline_ns: int,
        session: Session | None = None,
        metadata: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        self._session = session  # the registration the request came through (its reply goes there)
        self._metadata = metadata
        self._cancelled = False
        self._trailing: Any = None
        self._initial: Metadata | None = None  # None: not sent
        self._token = 0
        self._callbacks: list[Callable[[], Any]] | None = []
        self._method = method
        self._deadline_ns = deadline_ns
        self._code: StatusCode | None = None
        self._details = ""

    def time_remaining(self) -> float | None:
        if not self._deadline_ns:
            return None
        return max(0.0, (self._deadline_ns - time.monotonic_ns()) / 1e9)

    def abort(self, code: StatusCode, details: str) -> None:
        raise RpcError(code, details)

    def abort_with_status(self, status: Any) -> None:
        """Abort with a grpc.Status-like object (``code``, ``details``, ``trailing_metadata``)."""
        trailing = getattr(status, "trailing_metadata", None)
        if trailing:
            self.set_trailing_metadata(trailing)
        raise RpcError(status.code, getattr(status, "details", ""))

    def code(self) -> StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_code(self, code: StatusCode) -> None:
        self._code = StatusCode(code)

    def set_details(self, details: str) -> None:
        self._details = details

    def method(self) -> str:
        return self._method

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The caller's metadata: ``(key, value)`` pairs, bytes values for ``-bin`` keys."""
        return self._metadata

    def peer(self) -> str:
        """The calling app, its pid, daemon and address, as the caller's daemon announced them."""
        if self._session is None or not self._token:
            return "mrpc:unknown"
        try:
            return "mrpc:" + str(
                self._session.control({"op": "peer", "token": self._token})["peer"]
            )
        except RpcError:
            return "mrpc:unknown"

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        """Run ``callback()`` once when the call ends (answered or cancelled); False if it
        already ended."""
        if self._callbacks is None:
            return False
        self._callbacks.append(callback)
        return True

    def send_initial_metadata(self, metadata: Any) -> Awaitable[None]:
        """Send the server's initial metadata (gRPC headers): ``(key, value)`` pairs,
        bytes values for ``-bin`` keys. At most once per call, before the handler
        returns; ``await`` it in ``async def`` handlers (as with grpc.aio) or not (as
        with grpcio): it takes effect when called.

        A unary call has one response, so mrpc carries initial metadata with the reply
        or error (also an ``abort()`` after it); the caller reads it once the call
        completed: ``call.initial_metadata()`` of ``with_call``, ``future`` and
        ``aio_with_call``, or ``RpcError.initial_metadata()``. mrpcd checks the key rules
        (a break fails the call with INTERNAL at the caller: the server's fault) and
        ``max_metadata_size``, which counts initial and trailing metadata together
        (RESOURCE_EXHAUSTED at the caller).

        Raises ValueError when initial metadata was sent already or the call has ended
        (as grpcio: "no longer allowed"), RpcError(CANCELLED) when the caller cancelled,
        RpcError(INVALID_ARGUMENT) for an entry that is not a (str, str | bytes) pair;
        nothing is recorded then.
        """
        if self._cancelled:
            raise RpcError(StatusCode.CANCELLED, "send_initial_metadata: the caller cancelled")
        if self._initial is not None or self._callbacks is None:
            raise ValueError(
                "initial metadata no longer allowed: it was sent already or the call "
                "has ended; send it once, before the handler returns"
            )
        try:
            pairs = tuple(metadata)
            md.encode(pairs)  # types now, in the handler; key rules are mrpcd's
        except TypeError:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"send_initial_metadata: {type(metadata).__name__} is not a sequence of "
                f"(key, value) pairs",
            ) from None
        except md.MetadataError as e:
            raise RpcError(e.status, f"send_initial_metadata: {e}") from None
        self._initial = pairs
        return _SENT

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Metadata sent back with the reply (or error): ``(key, value)`` pairs."""
        try:
            md.encode(metadata)  # types now, in the handler; key rules are mrpcd's
        except md.MetadataError as e:
            raise RpcError(e.status, f"set_trailing_metadata: {e}") from None
        self._trailing = tuple(metadata)

    def cancelled(self) -> bool:
        return self._cancelled

    def _terminate(self) -> None:
        callbacks, self._callbacks = self._callbacks, None
        for cb in callbacks or ():
            try:
                cb()
            except Exception:
                log.exception("RPC termination callback failed")

    def is_active(self) -> bool:
        if self._cancelled:
            return False
        rem = self.time_remaining()
        return rem is None or rem > 0


class _Sent:
    """What ``send_initial_metadata`` returns: done already, awaitable for grpc.aio code."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


_SENT = _Sent()


@dataclass
class Handler:
    """One method's handler: ``fn(request)`` or ``fn(request, context)``, sync or async."""

    fn: Callable[..., Any]
    path: str
    request_cls: Any
    response_cls: Any
    is_async: bool
    takes_context: bool

    @classmethod
    def for_method(cls, fn: Callable[..., Any], schema: SchemaInfo, method: Any) -> Handler:
        return cls(
            fn,
            method.path,
            schema.MESSAGES[method.request],
            schema.MESSAGES[method.response],
            inspect.iscoroutinefunction(fn),
            takes_context(fn),
        )


def takes_context(fn: Callable[..., Any]) -> bool:
    """True if ``fn`` accepts ``(request, context)``, False for ``fn(request)``."""
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return True
    return len(params) >= 2


def handlers_of(servicer: Any) -> tuple[SchemaInfo, str, dict[int, Handler]]:
    """The schema and service of ``servicer`` and a handler per method it overrides.

    Raises ``TypeError`` if it does not derive from a generated ``<Service>Servicer``.
    """
    for klass in type(servicer).__mro__:
        schema = klass.__dict__.get("_MRPC_SCHEMA")
        if schema is not None:
            service: str = klass.__dict__["_MRPC_SERVICE"]
            break
    else:
        raise TypeError(
            f"{type(servicer).__name__} does not derive from a generated <Service>Servicer"
        )
    handlers: dict[int, Handler] = {}
    for mid in schema.SERVICES[service]:
        m = schema.METHODS[mid]
        fn = getattr(servicer, m.name, None)
        if fn is None or getattr(fn, "_mrpc_unimplemented", False):
            continue
        handlers[mid] = Handler.for_method(fn, schema, m)
    return schema, service, handlers


@dataclass(slots=True)  # not frozen: one is built per call (frozen __init__ is slower)
class Outcome:
    """How one call ended: ``reply`` when ``code`` is OK, else ``code`` and ``details``."""

    reply: Any
    code: StatusCode
    details: str
    trailing: Metadata | None  # set by the handler (None: it set none)
    initial: Metadata | None = None  # sent by the handler (None: it sent none)

    def error(self) -> RpcError:
        """The RpcError a caller sees for a failed outcome (with the handler's metadata)."""
        err = RpcError(self.code, self.details)
        if self.trailing:
            err._trailing = self.trailing  # type: ignore[attr-defined]
        if self.initial:
            err._initial = self.initial  # type: ignore[attr-defined]
        return err


def run_sync(h: Handler, request: Any, ctx: ServicerContext) -> Outcome:
    """Run a sync handler in this thread; every failure becomes a status."""
    inherit = CALL_DEADLINE.set(ctx._deadline_ns)  # nested calls inherit the deadline
    try:
        reply = h.fn(request, ctx) if h.takes_context else h.fn(request)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a status
        return outcome(h, ctx, None, e)
    finally:
        CALL_DEADLINE.reset(inherit)
    return outcome(h, ctx, reply, None)


async def run_async(h: Handler, request: Any, ctx: ServicerContext) -> Outcome:
    """Run an async handler in the running loop; every failure becomes a status."""
    CALL_DEADLINE.set(ctx._deadline_ns)  # this task's context: nested calls inherit it
    try:
        reply = await (h.fn(request, ctx) if h.takes_context else h.fn(request))
    except BaseException as e:  # noqa: BLE001
        return outcome(h, ctx, None, e)
    return outcome(h, ctx, reply, None)


def outcome(h: Handler, ctx: ServicerContext, reply: Any, error: BaseException | None) -> Outcome:
    """The status the handler's return (or exception) stands for; runs the callbacks."""
    ctx._terminate()
    trailing, initial = ctx._trailing, ctx._initial
    if error is not None:
        if isinstance(error, RpcError):
            return Outcome(None, error.code(), error.details(), trailing, initial)
        log.info("handler of %s raised %r", h.path, error)
        return Outcome(
            None,
            StatusCode.UNKNOWN,
            f"Exception calling application: {error!r}",
            trailing,
            initial,
        )
    if ctx._code not in (None, StatusCode.OK):
        return Outcome(None, StatusCode(ctx._code), ctx._details, trailing, initial)
    if not isinstance(reply, h.response_cls):
        details = (
            f"handler of {h.path} returned {type(reply).__name__}, "
            f"expected {h.response_cls._FULL_NAME}"
        )
        return Outcome(None, StatusCode.INTERNAL, details, trailing, initial)
    return Outcome(reply, StatusCode.OK, "", trailing, initial)
