"""Servers: receive requests through the local mrpcd and answer them.

Handlers are grpc-style servicer methods ``def M(self, request, context)`` or
plain closures (``add_method``), either sync or ``async def``. Sync handlers
run in a thread pool (like grpcio) or, with ``inline=True``, directly on the
completion thread (lowest latency; such handlers must not block or make sync
nested calls). Async handlers run on the server's event loop and may await
nested calls (``await stub.M.aio(req)``) freely.

When the local mrpcd goes away (restart, crash), a started server registers
again by itself: it retries with backoff (50 ms doubling to 1 s) until a daemon
answers at the same prefix, then binds its schemas and serves its services
again. If none does within ``reconnect_timeout`` seconds, the server stops and
``wait_for_termination()`` raises ``RpcError(UNAVAILABLE)`` saying so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

from libmrpc._dispatch import (
    Handler,
    Outcome,
    ServicerContext,
    handlers_of,
    run_async,
    run_sync,
)
from libmrpc._session import RecvBlock, Session, get_session
from libmrpc.status import RpcError, StatusCode
from libmrpc.stubs import SchemaInfo

__all__ = ["Server", "ServicerContext"]

log = logging.getLogger(__name__)


class Server:
    def __init__(
        self,
        prefix: str | os.PathLike[str] | None = None,
        *,
        max_workers: int = 8,
        inline: bool = False,
        name: str | None = None,
        reconnect_timeout: float = 60.0,
    ) -> None:
        """``reconnect_timeout``: seconds a started server waits for its mrpcd to come
        back after the daemon went away, before it stops (see the module doc)."""
        self._prefix = prefix
        self._reconnect_timeout = reconnect_timeout
        self._reconnecting = False
        self._reconnect_lock = threading.Lock()
        self._error: RpcError | None = None
        self._name = name
        self._inline = inline
        self._max_workers = max_workers
        self._pending: list[tuple[SchemaInfo, str, dict[int, Handler]]] = []
        self._handlers: dict[tuple[int, int], Handler] = {}
        self._session: Session | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._active = 0
        self._contexts: dict[int, ServicerContext] = {}  # token -> context of a running handler
        self._active_lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self.started = False

    # ------------------------------------------------------------------ setup

    def add_servicer(self, servicer: Any) -> None:
        """Serve every method ``servicer`` overrides; the others answer UNIMPLEMENTED."""
        self._add(*handlers_of(servicer))

    def add_method(self, module: Any, path: str, fn: Callable[..., Any]) -> None:
        """Serve method ``path`` ("/pkg.Service/Method") of a generated module with ``fn``.

        ``fn(request)`` or ``fn(request, context)``, sync or async: closures as handlers.
        """
        schema: SchemaInfo = module._SCHEMA_INFO
        for m in schema.METHODS:
            if path in (m.path, f"{m.service}/{m.name}"):
                self._add(schema, m.service, {m.id: Handler.for_method(fn, schema, m)})
                return
        raise ValueError(f"schema {schema.SCHEMA_HASH} has no method {path!r}")

    def _add(self, schema: SchemaInfo, service: str, handlers: dict[int, Handler]) -> None:
        if self.started:
            raise RuntimeError("add servicers before start()")
        for s, svc, hs in self._pending:
            if s is schema and svc == service:
                hs.update(handlers)
                return
        self._pending.append((schema, service, handlers))

    def start(self) -> None:
        """Register the services with the local daemon; requests flow from now on.

        Raises RpcError: UNAVAILABLE (no daemon), ALREADY_EXISTS (service served by
        another app at that daemon), INVALID_ARGUMENT (bad schema).
        """
        if self.started:
            return
        if any(h.is_async for _, _, hs in self._pending for h in hs.values()):
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._loop.run_forever, name="mrpc-server-loop", daemon=True
            )
            self._loop_thread.start()
        if not self._inline:
            self._executor = ThreadPoolExecutor(
                self._max_workers, thread_name_prefix="mrpc-handler"
            )
        self._register()
        self.started = True

    def _register(self) -> None:
        """Bind the schemas and serve the services at the local daemon (again)."""
        session = get_session(self._prefix, self._name)
        if session.server is not None and session.server is not self:
            raise RuntimeError("this process already runs a Server on that daemon")
        handlers: dict[tuple[int, int], Handler] = {}
        for schema, _service, hs in self._pending:
            slot = session.bind(schema)
            for mid, h in hs.items():
                handlers[(slot, mid)] = h
        self._handlers = handlers
        self._session = session
        session.server = self
        session.background(0)  # wake the completion thread: requests may arrive now
        for schema, service, _ in self._pending:
            session.control({"op": "serve", "slot": session.bind(schema), "services": [service]})

    def _session_lost(self, session: Session, reason: str) -> None:
        """Called by the session when its daemon went away: register again in the background."""
        with self._reconnect_lock:
            if (
                self._stopping
                or not self.started
                or session is not self._session
                or self._reconnecting
            ):
                return
            self._reconnecting = True
        threading.Thread(
            target=self._reconnect, args=(reason,), name="mrpc-server-reconnect", daemon=True
        ).start()

    def _reconnect(self, reason: str) -> None:
        where = self._session.prefix if self._session is not None else self._prefix
        log.info(
            "server: mrpcd at %s went away (%s); registering again (up to %gs)",
            where,
            reason,
            self._reconnect_timeout,
        )
        started = time.monotonic()
        delay, last = 0.05, "no attempt yet"
        while not self._stopping:
            try:
                self._register()
            except Exception as e:  # noqa: BLE001 - no daemon yet, or it refused: retry until the deadline
                last = f"{type(e).__name__}: {e}"
            else:
                with self._reconnect_lock:
                    session = self._session
                    if session is not None and not session.closed:  # else it went away again: retry
                        self._reconnecting = False
                        log.info(
                            "server: registered again with mrpcd at %s after %.2fs",
                            where,
                            time.monotonic() - started,
                        )
                        return
                last = "mrpcd went away again"
            if time.monotonic() - started + delay > self._reconnect_timeout:
                break
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        if self._stopping:
            return
        self._error = RpcError(
            StatusCode.UNAVAILABLE,
            f"the server stopped: mrpcd at {where} went away ({reason}) and did not come "
            f"back within {self._reconnect_timeout:g}s (last error: {last}); restart "
            f"the daemon and then this server, or raise reconnect_timeout",
        )
        log.error("%s", self._error.details())
        self._stopping = True
        self._shut_down()

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop taking requests (new ones get UNAVAILABLE), let running ones finish
        for up to ``grace`` seconds, then unregister. Returns an Event set when done."""
        if not self.started or self._stopping:
            self._stopped.set()
            return self._stopped
        self._stopping = True
        session = self._session
        assert session is not None
        try:
            session.control({"op": "unserve"})
        except RpcError:
            pass
        deadline = time.monotonic() + (grace or 0.0)
        while self._active and time.monotonic() < deadline:
            time.sleep(0.005)
        self._shut_down()
        return self._stopped

    def _shut_down(self) -> None:
        session = self._session
        if session is not None and session.server is self:
            session.server = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until the server stopped; True if it did within ``timeout``.

        Raises RpcError(UNAVAILABLE) if it stopped because its mrpcd went away and
        did not come back within ``reconnect_timeout``.
        """
        done = self._stopped.wait(timeout)
        if done and self._error is not None:
            raise self._error
        return done

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)

    # ------------------------------------------------------------------ serving

    def _dispatch(
        self,
        token: int,
        method_id: int,
        slot: int,
        off: int,
        length: int,
        deadline_ns: int,
        metadata: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        """Called on the completion thread for every request."""
        session = self._session
        assert session is not None
        h = self._handlers.get((slot, method_id))
        owner = RecvBlock(session, off)
        if h is None or self._stopping:
            code = StatusCode.UNAVAILABLE if self._stopping else StatusCode.UNIMPLEMENTED
            msg = (
                "server is stopping"
                if self._stopping
                else f"method id {method_id} is not implemented by server app {session.name!r}"
            )
            session.send_reply(token, None, code, msg)
            return
        request = h.request_cls._from_image(session.recv_view, off, owner)
        ctx = ServicerContext(h.path, deadline_ns, session, metadata)
        ctx._token = token
        self._contexts[token] = ctx
        with self._active_lock:
            self._active += 1
        if h.is_async:
            assert self._loop is not None
            asyncio.run_coroutine_threadsafe(self._run_async(h, request, ctx, token), self._loop)
        elif self._executor is not None:
            self._executor.submit(self._run_sync, h, request, ctx, token)
        else:
            self._run_sync(h, request, ctx, token)

    def _run_sync(self, h: Handler, request: Any, ctx: ServicerContext, token: int) -> None:
        self._answer(h, token, ctx, run_sync(h, request, ctx))

    async def _run_async(self, h: Handler, request: Any, ctx: ServicerContext, token: int) -> None:
        self._answer(h, token, ctx, await run_async(h, request, ctx))

    def _cancel(self, token: int) -> None:
        """The caller cancelled call ``token`` (completion thread): the handler's context
        turns inactive and its callbacks run; its reply will be discarded."""
        ctx = self._contexts.get(token)
        if ctx is not None and not ctx._cancelled:
            ctx._cancelled = True
            ctx._terminate()

    def _answer(self, h: Handler, token: int, ctx: ServicerContext, outcome: Outcome) -> None:
        session = ctx._session or self._session
        assert session is not None
        self._contexts.pop(token, None)
        try:
            if outcome.code is StatusCode.OK:
                session.send_reply(
                    token, outcome.reply, trailing=outcome.trailing, initial=outcome.initial
                )
            else:
                session.send_reply(
                    token,
                    None,
                    outcome.code,
                    outcome.details,
                    trailing=outcome.trailing,
                    initial=outcome.initial,
                )
        except RpcError as e:
            log.warning("could not answer %s: %s", h.path, e)
        finally:
            with self._active_lock:
                self._active -= 1
