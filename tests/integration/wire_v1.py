"""The "old" tcp transport for the wire-feature tests: today's engines with the
``batch`` wire feature taken away and a lower VERSION.

It stands for the release before BATCH: it understands FEATURES frames (the
re-announcement that lets a later upgrade switch live connections) but neither
advertises nor accepts BATCH — a BATCH frame sent to it closes the connection,
exactly as an unknown frame type did before wire features existed. Loaded at
daemon start with ``engines: {tcp: tests.integration.wire_v1}``; upgraded to the
current code with ``mrpcctl engine upgrade tcp --module engines.tcp`` and
``mrpcctl engine upgrade tcp-ingress --module engines.tcp_ingress``.
"""

from __future__ import annotations

from engines.tcp import TcpTransport
from engines.tcp_features import FEAT_FEATURES
from engines.tcp_ingress import TcpIngress

V1_FEATURES = frozenset({FEAT_FEATURES})


class TcpTransportV1(TcpTransport):
    VERSION = 1
    WIRE_FEATURES = V1_FEATURES


class TcpIngressV1(TcpIngress):
    VERSION = 1
    WIRE_FEATURES = V1_FEATURES


ENGINE = TcpTransportV1
INGRESS = TcpIngressV1
