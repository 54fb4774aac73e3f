"""The engine API: the one door between the daemon and its engines.

Engines (``engines/*`` and third-party ones, loaded by configured module path)
import from here and from libmrpc's pure layers, nothing else of the daemon:

- :mod:`mrpcd.engine.core`: RPC items, the engine contract, roles
  (frontend, transport, ingress: always on; policy: attachable), the lifecycle.
- :mod:`mrpcd.engine.items`: what a call carries between frontend and transport.
- :mod:`mrpcd.engine.ports`: what the daemon lends engines (an app's port,
  routing, the runtime's poller, daemon-wide settings).
- :mod:`mrpcd.engine.settings`: the ``tcp.*`` and ``limits.*`` settings.
"""

from mrpcd.engine.core import (
    ENGINE_API_VERSION,
    LIFECYCLE,
    Clock,
    Engine,
    EngineContext,
    EngineState,
    FrontendEngine,
    IngressEngine,
    LifecycleError,
    MethodRef,
    MockClock,
    MonotonicClock,
    PolicyEngine,
    Reject,
    Rpc,
    RpcKind,
    Side,
    TransportEngine,
    Verdict,
    validate_engine_class,
)
from mrpcd.engine.items import Binding, ConnSpec, Landed, RxCall, TxCall, TxReply, make_private
from mrpcd.engine.ports import AppPort, Poller, RouterPort, Services
from mrpcd.engine.settings import DEFAULT_LIMITS, DEFAULT_TCP, LimitsConfig, TcpConfig

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TCP",
    "ENGINE_API_VERSION",
    "LIFECYCLE",
    "AppPort",
    "Binding",
    "Clock",
    "ConnSpec",
    "Engine",
    "EngineContext",
    "EngineState",
    "FrontendEngine",
    "IngressEngine",
    "Landed",
    "LifecycleError",
    "LimitsConfig",
    "MethodRef",
    "MockClock",
    "MonotonicClock",
    "PolicyEngine",
    "Poller",
    "Reject",
    "RouterPort",
    "Rpc",
    "RpcKind",
    "RxCall",
    "Services",
    "Side",
    "TcpConfig",
    "TransportEngine",
    "TxCall",
    "TxReply",
    "Verdict",
    "make_private",
    "validate_engine_class",
]
