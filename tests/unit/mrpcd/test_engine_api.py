"""The PolicyEngine base: a failing policy fails the call, it never loses it."""

from __future__ import annotations

from collections import deque

from libmrpc.status import StatusCode
from libmrpc.wire.errors import WireError
from mrpcd.engine import (
    EngineContext,
    MethodRef,
    MockClock,
    PolicyEngine,
    Rpc,
    RpcKind,
    Side,
    Verdict,
)


class Fragile(PolicyEngine):
    NAME = "fragile"

    @classmethod
    def validate_config(cls, config):
        return cls.common_config(config, ())

    def on_call(self, rpc: Rpc):
        if rpc.call_id == 1:
            rpc.view()  # the message has bad references
        if rpc.call_id == 2:
            raise KeyError("a bug")
        return Verdict.PASS


def _bad_view():
    raise WireError("payload: reference past the heap", StatusCode.INVALID_ARGUMENT)


def test_policy_errors_become_statuses_not_lost_calls() -> None:
    eng = Fragile(EngineContext("app/fragile-1", "app", 1, MockClock(), side=Side.SEND), {})
    tx_in, tx_out, rx_in, rx_out = deque(), deque(), deque(), deque()
    eng.bind(tx_in, tx_out, rx_in, rx_out)
    m = MethodRef(0, "s.S", "M", "/s.S/M", "s.A", "s.B")
    for i in (1, 2, 3):
        tx_in.append(Rpc(RpcKind.CALL, "app", 1, i, m, _view=_bad_view))
    assert eng.do_work() == 3
    assert [r.call_id for r in tx_out] == [3]
    errors = {r.call_id: r for r in rx_out}
    assert errors[1].status is StatusCode.INVALID_ARGUMENT and "payload" in errors[1].details
    assert errors[2].status is StatusCode.INTERNAL and "fragile" in errors[2].details
