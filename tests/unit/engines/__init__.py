"""Unit tests of the policy engines, plus small builders they share.

Engines are driven directly: build ``Rpc`` items, bind four deques, call
``do_work()`` and advance a :class:`MockClock`; nothing sleeps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from libmrpc.status import StatusCode
from mrpcd.engine import Engine, EngineContext, MethodRef, MockClock, Rpc, RpcKind, Services, Side

GET = MethodRef(
    id=1,
    service="kv.KV",
    name="Get",
    path="/kv.KV/Get",
    request="kv.GetRequest",
    response="kv.GetReply",
)
PUT = MethodRef(
    id=2,
    service="kv.KV",
    name="Put",
    path="/kv.KV/Put",
    request="kv.PutRequest",
    response="kv.PutReply",
)


def make_ctx(
    clock: MockClock,
    *,
    side: Side = Side.SEND,
    app: str = "kv",
    engine_id: str | None = None,
    method: str | None = None,
    runtime_local: dict[str, Any] | None = None,
    services: Services | None = None,
) -> EngineContext:
    return EngineContext(
        engine_id=engine_id or f"{app}/test-1",
        app=app,
        app_pid=1,
        clock=clock,
        side=side,
        method=method,
        runtime_local=runtime_local if runtime_local is not None else {},
        services=services if services is not None else Services(),
    )


def call(
    i: int,
    clock: MockClock,
    *,
    size: int = 64,
    app: str = "kv",
    method: MethodRef | None = GET,
    deadline: float | None = None,
    view: Callable[[], Any] | None = None,
) -> Rpc:
    return Rpc(
        kind=RpcKind.CALL,
        app=app,
        app_pid=1,
        call_id=i,
        method=method,
        size=size,
        created=clock.now(),
        deadline=deadline,
        _view=view,
    )


def reply(rpc: Rpc, status: StatusCode = StatusCode.OK, size: int = 8) -> Rpc:
    return Rpc(
        kind=RpcKind.REPLY,
        app=rpc.app,
        app_pid=rpc.app_pid,
        call_id=rpc.call_id,
        method=rpc.method,
        status=status,
        size=size,
        created=rpc.created,
        details="" if status is StatusCode.OK else f"failed with {status.name}",
    )


@dataclass
class Wires:
    """The four deques around one engine."""

    tx_in: deque[Rpc] = field(default_factory=deque)
    tx_out: deque[Rpc] = field(default_factory=deque)
    rx_in: deque[Rpc] = field(default_factory=deque)
    rx_out: deque[Rpc] = field(default_factory=deque)

    def ids(self, name: str) -> list[int]:
        return [r.call_id for r in getattr(self, name)]


def wire(engine: Engine, wires: Wires | None = None) -> Wires:
    w = wires or Wires()
    engine.bind(w.tx_in, w.tx_out, w.rx_in, w.rx_out)
    return w
