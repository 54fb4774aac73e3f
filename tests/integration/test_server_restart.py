"""Server applications outlive a restart of their daemon: they register again by themselves."""

from __future__ import annotations

import signal
import time

import pytest

import libmrpc
from libmrpc import RpcError, StatusCode
from tests.integration.conftest import ROOT, Cluster

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


def call_until_served(stub: object, timeout: float = 30) -> tuple[str, int]:
    """Call until a call succeeds; (served_by, failed calls before that)."""
    deadline = time.monotonic() + timeout
    failures = 0
    while True:
        try:
            reply = stub.Call(testing.Request(payload=b"again"), timeout=2)  # type: ignore[attr-defined]
            return reply.served_by, failures
        except RpcError as e:
            failures += 1
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no call succeeded within {timeout}s; last error: {e}"
                ) from None
            time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_server_registers_again_after_its_daemon_restarts(cluster: Cluster, sig: int) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    srv = cluster.server(b, name="srv")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="client"))
    assert stub.Call(testing.Request(payload=b"x"), timeout=10).served_by == "srv"
    b.stop(sig)
    time.sleep(0.3)  # the server notices and starts retrying against no daemon
    b2 = cluster.daemon("b", "--listen", b.listen)  # same prefix, same address
    served_by, failures = call_until_served(stub)
    assert served_by == "srv" and srv.proc.poll() is None
    print(f"\n{signal.Signals(sig).name}: calls again after {failures} failed attempts")
    (app,) = b2.apps()
    assert app["name"] == "srv" and app["serves"] == ["mrpctest.Test"]
    for _ in range(20):
        assert stub.Call(testing.Request(payload=b"y"), timeout=10).served_by == "srv"


def test_server_stops_with_a_clear_error_if_its_daemon_stays_away(cluster: Cluster) -> None:
    b = cluster.daemon("b")

    class Echo(testing.TestServicer):
        def Call(self, request, context):  # type: ignore[no-untyped-def]
            return testing.Reply(served_by="here")

    server = libmrpc.Server(prefix=b.prefix, name="lonely", reconnect_timeout=1.0)
    server.add_servicer(Echo())
    server.start()
    assert not server.wait_for_termination(0.2)
    b.stop(signal.SIGKILL)
    with pytest.raises(RpcError) as info:
        server.wait_for_termination(15)
    assert info.value.code() == StatusCode.UNAVAILABLE
    assert (
        "did not come back within 1s" in info.value.details()
        and str(b.prefix) in info.value.details()
    )
