"""The ``metrics`` policy: Prometheus counters and latency histograms per app and method.

How this works
--------------
The engine never changes an RPC; it counts what passes. On the send side (the
app is a client) it exports the ``grpc_client_*`` family, on the receive side
(the app is a server) the ``grpc_server_*`` family, named and labelled like
go-grpc-prometheus so existing dashboards work (``grpc_code`` uses gRPC's
canonical names "OK", "ResourceExhausted", ...), plus an ``app`` label:

========================================  =========  ======================================
metric                                    type       labels
========================================  =========  ======================================
grpc_{client,server}_started_total        counter    app, grpc_service, grpc_method
grpc_{client,server}_handled_total        counter    app, grpc_service, grpc_method, grpc_code
grpc_{client,server}_handling_seconds     histogram  app, grpc_service, grpc_method
mrpc_rpc_bytes_total                      counter    app, direction ("tx" to network, "rx")
========================================  =========  ======================================

Latency is clock time from seeing the CALL to seeing its REPLY (same
``call_id``); the engine keeps ``call_id -> start`` for calls in flight, at most
``max_inflight`` entries (the oldest is evicted and counted as ``evicted``).
Replies created by policies after this one (rejections) are counted with their
status. All metrics engines of a daemon share one registry: the daemon's
``ctx.services.metrics_registry`` (served by the daemon's ``metrics.listen``
endpoint) or else this module's own; metric objects
are cached per registry because several instances register the same names
(the cache survives a reload of this module, i.e. a live upgrade).

OpenTelemetry equivalents (semantic conventions for RPC): ``grpc_*_handling_seconds``
is ``rpc.server.duration`` / ``rpc.client.duration`` (``rpc.{server,client}.call.duration``
in newer conventions) with attributes ``rpc.system="grpc"``, ``rpc.service``,
``rpc.method`` and ``rpc.grpc.status_code``; ``grpc_*_handled_total`` is the count
of those histograms by status; ``mrpc_rpc_bytes_total`` sums
``rpc.{client,server}.request.size`` and ``.response.size``. ``started_total``
has no OTel instrument (it is ``handled`` plus calls in flight).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from libmrpc.status import ConfigError, StatusCode
from mrpcd.engine import EngineContext, PolicyEngine, Reject, Rpc, RpcKind, Side, Verdict

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client import generate_latest as _generate_latest
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the metrics engine needs prometheus_client: pip install 'mrpc[metrics]'"
    ) from exc

LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
DEFAULTS: dict[str, Any] = {"max_inflight": 1_000_000}
#: gRPC's canonical code names, as go-grpc-prometheus puts them in ``grpc_code``.
CODE_NAMES = {c: "".join(p.capitalize() for p in c.name.split("_")) for c in StatusCode}
CODE_NAMES[StatusCode.OK] = "OK"
CODE_NAMES[StatusCode.CANCELLED] = "Canceled"

# Module state survives ``importlib.reload`` (live upgrade re-executes this module in
# the same namespace): registering the same metric names again would fail.
_default_registry: CollectorRegistry = globals().get("_default_registry") or CollectorRegistry()
_families_lock: threading.Lock = globals().get("_families_lock") or threading.Lock()


class _Families:
    """The metric objects of one registry (created once, shared by every engine)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        m, mc = (
            ("app", "grpc_service", "grpc_method"),
            ("app", "grpc_service", "grpc_method", "grpc_code"),
        )
        self.started: dict[str, Counter] = {}
        self.handled: dict[str, Counter] = {}
        self.seconds: dict[str, Histogram] = {}
        for role in ("client", "server"):
            self.started[role] = Counter(
                f"grpc_{role}_started_total",
                f"RPCs started on the {role} (mrpc).",
                m,
                registry=registry,
            )
            self.handled[role] = Counter(
                f"grpc_{role}_handled_total",
                f"RPCs completed on the {role}, by status code (mrpc).",
                mc,
                registry=registry,
            )
            self.seconds[role] = Histogram(
                f"grpc_{role}_handling_seconds",
                f"Seconds from call to reply on the {role} (mrpc).",
                m,
                buckets=LATENCY_BUCKETS,
                registry=registry,
            )
        self.bytes = Counter(
            "mrpc_rpc_bytes_total",
            "Message bytes through mrpc policies.",
            ("app", "direction"),
            registry=registry,
        )


def families(registry: CollectorRegistry) -> Any:
    """The shared metric objects of ``registry``, registering them on first use.

    Kept on the registry itself, so a fresh copy of this module (a live upgrade
    loads the engine's code as a new module object) finds the same objects."""
    with _families_lock:
        found = getattr(registry, "_mrpc_families", None)
        if found is None:
            found = _Families(registry)
            registry._mrpc_families = found  # type: ignore[attr-defined]
        return found


def default_registry() -> CollectorRegistry:
    """The registry used when the daemon provides none."""
    return _default_registry


def render(registry: CollectorRegistry | None = None) -> bytes:
    """The Prometheus text exposition of ``registry`` (default: this module's)."""
    return _generate_latest(registry if registry is not None else _default_registry)


class Metrics(PolicyEngine):
    """Counts calls, replies, bytes and latency; forwards everything unchanged."""

    NAME = "metrics"
    VERSION = 1

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.counters.update({"replies": 0, "unmatched_replies": 0, "evicted": 0})
        fam = families(self._registry())
        role = "client" if ctx.side is Side.SEND else "server"
        self._started, self._handled, self._seconds = (
            fam.started[role],
            fam.handled[role],
            fam.seconds[role],
        )
        self._tx_bytes = fam.bytes.labels(ctx.app, "tx")
        self._rx_bytes = fam.bytes.labels(ctx.app, "rx")
        self._children: dict[Any, Any] = {}  # label-child cache: (kind, path[, code]) -> child
        self._inflight: dict[int, float] = {}  # call_id -> clock time the call was seen

    def _registry(self) -> CollectorRegistry:
        registry = self.ctx.services.metrics_registry
        return registry if registry is not None else _default_registry

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """``{"enforce", "max_inflight"}``; ``ConfigError`` names the bad key and value."""
        out = cls.common_config(config, set(DEFAULTS))
        value = config.get("max_inflight", DEFAULTS["max_inflight"])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{cls.NAME}: max_inflight: expected an integer >= 1, got {value!r}")
        out["max_inflight"] = value
        return out

    # ------------------------------------------------------------------ datapath

    def do_work(self) -> int:
        send = self.ctx.side is Side.SEND
        return self._pump(self.tx_in, self.tx_out, self._tx_bytes, calls=send) + self._pump(
            self.rx_in, self.rx_out, self._rx_bytes, calls=not send
        )

    def _pump(self, src: deque[Rpc], dst: deque[Rpc], nbytes: Any, *, calls: bool) -> int:
        """Move ``src`` to ``dst``: decide our side's CALLs, observe the REPLYs coming back."""
        n = 0
        while src:
            rpc = src.popleft()
            n += 1
            if rpc.size:
                nbytes.inc(rpc.size)
            if rpc.kind is RpcKind.CALL and calls:
                self._decide(rpc)  # on_call, then forwarded by release()
                continue
            if rpc.kind is RpcKind.REPLY and not calls and self.matches(rpc):
                self._observe(rpc)
            dst.append(rpc)
        return n

    def _labels(self, rpc: Rpc) -> tuple[str, str, str]:
        m = rpc.method
        return (self.ctx.app, m.service, m.name) if m else (self.ctx.app, "unknown", "unknown")

    def _child(self, key: tuple[Any, ...], family: Any, labels: tuple[str, ...]) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def on_call(self, rpc: Rpc) -> Verdict | Reject:
        path = rpc.method.path if rpc.method else ""
        self._child(("s", path), self._started, self._labels(rpc)).inc()
        inflight = self._inflight
        if len(inflight) >= self.config["max_inflight"]:
            del inflight[next(iter(inflight))]  # oldest first (dicts keep insertion order)
            self.counters["evicted"] += 1
        inflight[rpc.call_id] = self.ctx.clock.now()
        return Verdict.PASS

    def _observe(self, rpc: Rpc) -> None:
        self.counters["replies"] += 1
        path = rpc.method.path if rpc.method else ""
        labels = self._labels(rpc)
        code = CODE_NAMES.get(rpc.status, str(int(rpc.status)))
        self._child(("h", path, code), self._handled, (*labels, code)).inc()
        start = self._inflight.pop(rpc.call_id, None)
        if start is None:
            self.counters["unmatched_replies"] += 1
        else:
            self._child(("t", path), self._seconds, labels).observe(self.ctx.clock.now() - start)

    # ------------------------------------------------------------------ state

    def statistics(self) -> dict[str, int | float]:
        stats: dict[str, int | float] = dict(self.counters)
        stats["inflight"] = len(self._inflight)
        return stats

    def decompose(self) -> dict[str, Any]:
        """Counters and start times of calls in flight (the registry lives on by itself)."""
        return {
            "counters": dict(self.counters),
            "inflight": [[cid, t] for cid, t in self._inflight.items()],
        }

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        super().load_state(state, prev_version)
        self._inflight = {int(cid): float(t) for cid, t in state.get("inflight", [])}

    def handle_request(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """``stats`` -> counters; ``scrape`` -> the registry's text exposition."""
        op = cmd.get("op")
        if op == "stats":
            return {"engine": self.NAME, "id": self.ctx.engine_id, "stats": self.statistics()}
        if op == "scrape":
            return {"text": render(self._registry()).decode()}
        return super().handle_request(cmd)


ENGINE = Metrics
