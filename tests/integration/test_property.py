"""Property: random messages of a schema using every field type survive
client app -> mrpcd -> mrpcd -> server app -> and back, exactly."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

import libmrpc
from tests.integration.conftest import ROOT, Cluster
from tests.unit.libmrpc.wire.test_marshal_property import ALLTYPES, message_strategy

alltypes = libmrpc.load_proto(ROOT / "schemas" / "alltypes.proto")


def test_random_alltypes_messages_roundtrip_through_two_daemons(cluster: Cluster) -> None:
    # a low zero-copy threshold makes random bytes/string fields travel as scatter-gather segments
    env = {"MRPC_TCP_ZERO_COPY_MIN": "48"}
    a, b = cluster.daemon("a", env=env), cluster.daemon("b", env=env)
    cluster.server(b, "--alltypes")
    stub = alltypes.AllTypesServiceStub(libmrpc.connect(b.listen, prefix=a.prefix, name="property"))
    checked = []

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(pb=message_strategy(ALLTYPES, depth=2))
    def roundtrip(pb) -> None:
        request = alltypes.AllTypes.from_pb(pb)
        reply = stub.Roundtrip(request, timeout=20)
        assert reply.to_pb() == pb
        checked.append(pb.ByteSize())

    roundtrip()
    assert len(checked) == 80 and max(checked) > 48
