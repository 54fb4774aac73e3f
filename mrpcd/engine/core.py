"""The engine contract: RPC items, contexts, engines, policies, the lifecycle.

Every engine — in-tree or third-party — is written against the engine API
(``mrpcd.engine``) only. An engine is a non-blocking unit of work sitting in a
*datapath* (the chain ``frontend -> [policies...] -> transport`` serving one
application). Items flow in two directions through four queues the datapath
hands the engine:

    tx_in  -> engine -> tx_out      (toward the network)
    rx_out <- engine <- rx_in       (toward the application)

Items are :class:`Rpc` objects. The queues belong to the datapath, not to the
engine, so detaching, upgrading or replacing an engine never loses what sits in
them; whatever an engine holds internally (a delay queue) it hands over through
``flush()`` (push it on) or ``decompose()`` (give it to its successor).

Engines never sleep and never block: ``do_work()`` does what can be done now and
returns how many items it processed. Time comes from ``ctx.clock`` so that
time-based logic is tested with :class:`MockClock`, without sleeping.

Roles are classes: a :class:`FrontendEngine` and a :class:`TransportEngine` are
always on (every datapath has exactly one of each, the daemon places them), a
:class:`PolicyEngine` is attachable (operators attach, detach and reconfigure
it), an :class:`IngressEngine` is the daemon-wide half of a transport.

Lifecycle (one table, :data:`LIFECYCLE`; ``Engine.lifecycle(event)`` moves)::

    loaded --attach--> attached --detach--> detached
                          |  ^
                  upgrade |  | restore / rollback
                          v  |
                      decomposed --retire--> detached
"""

from __future__ import annotations

import abc
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from libmrpc.status import ConfigError, StatusCode
from libmrpc.wire.errors import WireError
from mrpcd.engine.ports import AppPort, Poller, Services

ENGINE_API_VERSION = 1


class EngineState(str, enum.Enum):
    LOADED = "loaded"  # built and configured, in no datapath yet
    ATTACHED = "attached"  # spliced into a datapath; do_work runs
    DECOMPOSED = "decomposed"  # its state was handed to a successor (live upgrade)
    DETACHED = "detached"  # out of every datapath, closed; never comes back


#: The engine lifecycle: state -> {event: next state}. Anything else is a bug
#: in the daemon (``LifecycleError``), never a silent no-op.
LIFECYCLE: dict[EngineState, dict[str, EngineState]] = {
    EngineState.LOADED: {"attach": EngineState.ATTACHED, "detach": EngineState.DETACHED},
    EngineState.ATTACHED: {"detach": EngineState.DETACHED, "upgrade": EngineState.DECOMPOSED},
    EngineState.DECOMPOSED: {
        "restore": EngineState.ATTACHED,
        "rollback": EngineState.ATTACHED,
        "retire": EngineState.DETACHED,
    },
    EngineState.DETACHED: {},
}


class LifecycleError(RuntimeError):
    """The daemon asked an engine for a move its lifecycle does not have (a daemon bug)."""


# --------------------------------------------------------------------------- clocks


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...


class MonotonicClock:
    """The daemon's clock: ``now`` is ``time.monotonic`` itself (read ~30 times per RPC
    per daemon; a Python method around it cost a frame each time)."""

    now = staticmethod(time.monotonic)


class MockClock:
    """A clock that moves only when told to (``advance``); for tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock never goes backwards")
        self._now += seconds


# --------------------------------------------------------------------------- RPC items


class RpcKind(enum.IntEnum):
    CALL = 1  # a request: outbound from a client app (tx) or inbound for a server app (rx)
    REPLY = 2  # a reply or error: outbound from a server app (tx) or inbound for a client (rx)
    RECLAIM = 3  # daemon bookkeeping: the app may reuse the send-heap memory of call_id
    CANCEL = 4  # the caller cancelled call_id (tx: the app's own call; rx: a remote caller's)


class Side(str, enum.Enum):
    SEND = "send"  # calls the application sends (client role), seen in the tx direction
    RECEIVE = "receive"  # calls the application receives (server role), seen in rx


@dataclass(frozen=True, slots=True)
class MethodRef:
    """What engines know about a method (a subset of the schema's MethodInfo)."""

    id: int
    service: str  # full service name, "echo.Echo"
    name: str  # method name, "Echo"
    path: str  # "/echo.Echo/Echo"
    request: str  # full request message name
    response: str  # full response message name

    @classmethod
    def of(cls, info: Any) -> MethodRef:
        """From a generated schema's MethodInfo."""
        return cls(info.id, info.service, info.name, info.path, info.request, info.response)


@dataclass(eq=False, slots=True)
class Rpc:
    """One RPC (or reply) moving through a datapath.

    Policies read the public fields. ``view()`` gives a read-only message view
    of the payload in daemon-private memory, safe against the application
    changing shared memory after the check (the bytes checked are the bytes
    sent). Fields whose names start with ``_`` belong to the frontend and
    transport.
    """

    kind: RpcKind
    app: str  # name of the application whose datapath this is
    app_pid: int
    call_id: int  # unique per datapath while the call is alive; a CALL and its REPLY share it
    method: MethodRef | None
    deadline: float | None = None  # clock time, or None
    status: StatusCode = StatusCode.OK  # for REPLY: the call's outcome
    details: str = ""
    size: int = 0  # bytes of the message image (0 until known)
    created: float = 0.0  # clock time the daemon first saw this item
    meta: dict[str, Any] = field(default_factory=dict)  # scratch space for engines
    metadata: tuple[
        tuple[str, str | bytes], ...
    ] = ()  # the call's gRPC metadata (checked, read-only)
    peer: str = ""  # inbound calls: the calling app, its daemon and address (as its daemon says)
    # --- frontend/transport private state ---
    _view: Callable[[], Any] | None = None
    _state: Any = None
    _cancelled: bool = False  # the caller cancelled this CALL (set by frontend / tcp-ingress)
    _wire_id: int = 0  # the tcp transport's id of an outbound CALL

    @property
    def is_error(self) -> bool:
        return self.kind is RpcKind.REPLY and self.status is not StatusCode.OK

    def view(self) -> Any:
        """The message as a read-only view over daemon-private memory.

        Raises ``LookupError`` when the payload is not available (error replies).
        """
        if self._view is None:
            raise LookupError(f"rpc {self.call_id} of {self.app!r} carries no message")
        return self._view()

    def error_reply(self, status: StatusCode, details: str) -> Rpc:
        """A REPLY carrying ``status`` for this CALL, to go back the way it came.

        It keeps the call's ``_state``: the transport answers an inbound call's
        caller with it, the frontend completes an outbound call with it."""
        if self.kind is not RpcKind.CALL:
            raise ValueError("only a CALL can be answered with an error")
        return Rpc(
            kind=RpcKind.REPLY,
            app=self.app,
            app_pid=self.app_pid,
            call_id=self.call_id,
            method=self.method,
            deadline=self.deadline,
            status=StatusCode(status),
            details=details,
            created=self.created,
            meta=self.meta,
            peer=self.peer,
            _state=self._state,
        )


# --------------------------------------------------------------------------- context


def _no_wake() -> None:
    pass


@dataclass
class EngineContext:
    """What the daemon gives an engine: identity, clock, log, services, its app's port."""

    engine_id: str  # stable operator-facing id, e.g. "kv/ratelimit-1"
    app: str  # application name ("" for daemon-wide engines)
    app_pid: int
    clock: Clock
    side: Side = Side.SEND
    method: str | None = None  # restrict to one method ("Echo" or "/echo.Echo/Echo")
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("mrpcd.engine"))
    #: state shared by the engines of one runtime (e.g. QoS's view of all apps on it)
    runtime_local: dict[str, Any] = field(default_factory=dict)
    services: Services = field(default_factory=Services)
    port: AppPort | None = None  # the application (None for daemon-wide engines)
    poller: Poller | None = None  # the owning runtime's epoll set (always-on engines)
    #: wake the runtime that drives this engine; thread-safe, cheap when called from it
    wake: Callable[[], None] = _no_wake
    listener: Any = None  # the daemon's listening socket (ingress engines)


# --------------------------------------------------------------------------- engines


class Engine(abc.ABC):
    """The engine contract (DESIGN.md, "Engines, runtimes, datapaths")."""

    NAME: ClassVar[str]
    VERSION: ClassVar[int] = 1
    #: Operators may attach and detach it (policies); the others are always on.
    ATTACHABLE: ClassVar[bool] = False
    #: True for policies that read message content: the datapath then gives
    #: ``Rpc.view()`` a daemon-private copy before this engine runs.
    READS_CONTENT: ClassVar[bool] = False

    tx_in: deque[Rpc]
    tx_out: deque[Rpc]
    rx_in: deque[Rpc]
    rx_out: deque[Rpc]

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.config = dict(self.validate_config(config))
        self.tx_in, self.tx_out, self.rx_in, self.rx_out = deque(), deque(), deque(), deque()
        self.state = EngineState.LOADED

    def lifecycle(self, event: str) -> EngineState:
        """Move along :data:`LIFECYCLE`; raise ``LifecycleError`` for a move it lacks."""
        nxt = LIFECYCLE[self.state].get(event)
        if nxt is None:
            raise LifecycleError(
                f"engine {self.ctx.engine_id}: cannot {event} when {self.state.value}"
            )
        self.state = nxt
        return nxt

    def bind(
        self, tx_in: deque[Rpc], tx_out: deque[Rpc], rx_in: deque[Rpc], rx_out: deque[Rpc]
    ) -> None:
        """Called by the datapath to splice the engine in."""
        self.tx_in, self.tx_out, self.rx_in, self.rx_out = tx_in, tx_out, rx_in, rx_out

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """Return the complete, checked config; raise ``ConfigError`` naming the key."""
        if config:
            raise ConfigError(f"engine {cls.NAME!r} takes no config keys, got {sorted(config)}")
        return {}

    @abc.abstractmethod
    def do_work(self) -> int:
        """Process what can be processed now; return the number of items (0 = idle)."""

    def flush(self) -> int:
        """Push every buffered item on to the next engine; return how many."""
        return 0

    def decompose(self) -> dict[str, Any]:
        """Hand over internal state (plain data and Rpc objects) for ``restore``."""
        return {}

    @classmethod
    def check_compatible(cls, prev_version: int, state: Mapping[str, Any]) -> str | None:
        """Can this version take over ``state``, decomposed by version ``prev_version``?

        None accepts; a string refuses and says why (the upgrade is rolled back:
        the running instance keeps its state). Called before ``restore``."""
        return None

    @classmethod
    def restore(
        cls,
        ctx: EngineContext,
        config: Mapping[str, Any],
        state: Mapping[str, Any],
        prev_version: int,
    ) -> Engine:
        """Build an engine of this version from a predecessor's ``decompose()``
        (``ValueError`` when ``check_compatible`` refuses it)."""
        refusal = cls.check_compatible(prev_version, state)
        if refusal is not None:
            raise ValueError(f"{cls.NAME} v{cls.VERSION} cannot restore v{prev_version}: {refusal}")
        engine = cls(ctx, config)
        engine.load_state(state, prev_version)
        return engine

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        """Adopt ``state``; the default accepts only an empty state."""
        if state:
            raise ValueError(f"{self.NAME} v{self.VERSION} cannot restore state {sorted(state)}")

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Change config in place, all or nothing: validate first, then apply."""
        merged = dict(self.config)
        merged.update(config)
        self.config = dict(self.validate_config(merged))

    def handle_request(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """An operator command addressed to this engine."""
        raise ValueError(f"engine {self.NAME!r} has no command {cmd.get('op')!r}")

    def statistics(self) -> dict[str, int | float]:
        return {}

    def next_timer(self) -> float | None:
        """Clock time at which ``do_work`` must run even with no new input."""
        return None

    def prepare_sleep(self) -> bool:
        """The runtime is about to block: arm wake-ups; return True if work is pending."""
        return False

    def woke(self) -> None:
        """The runtime woke from blocking (undo what ``prepare_sleep`` armed)."""

    def close(self) -> None:
        """Release OS resources; called after detach (and after ``decompose``)."""


# --------------------------------------------------------------------------- roles


class FrontendEngine(Engine):
    """Always on, first in every datapath: the application's rings on one side.

    It is the one place messages are marshalled. The datapath tells it, through
    :meth:`need_private_images`, whether a policy that reads message content is
    spliced in; while one is, images are daemon-private copies (what a policy
    checks is what is sent), else bulk fields go out zero-copy.
    """

    private_images: bool = False

    def need_private_images(self, on: bool) -> None:
        """Called by the datapath (on its runtime) whenever its chain changes."""
        self.private_images = on


class TransportEngine(Engine):
    """Always on, last in every datapath: the network side of one application.

    tx: CALLs (send them), REPLYs (answer inbound calls), CANCELs (of the app's
    calls); rx: replies to the app's calls, and whatever the daemon
    :meth:`~mrpcd.engine.ports.AppPort.deliver`-ed to the app (inbound calls,
    their cancellations, reclaims), which arrives in ``rx_in``.
    """

    def abandon(self, rpcs: list[Rpc], details: str) -> None:
        """The app is gone: answer every inbound call among ``rpcs`` (queued in its
        datapath or being served) with UNAVAILABLE ``details``; drop the rest."""


class IngressEngine(Engine):
    """Always on, daemon-wide: the listening half of a transport (no datapath)."""


# --------------------------------------------------------------------------- policies


class Verdict(enum.Enum):
    PASS = "pass"
    HOLD = "hold"  # the engine keeps the call and forwards it later with ``release``


@dataclass(frozen=True, slots=True)
class Reject:
    status: StatusCode
    details: str


class PolicyEngine(Engine):
    """Base for policies: decides on CALLs of one side, observes replies.

    Subclasses implement ``on_call`` (and optionally ``on_reply``). The base
    handles direction (``ctx.side``), the ``method`` filter, shadow mode
    (``enforce: false`` counts and logs what it would have done and passes the
    call) and turning rejections into error replies toward the caller.
    """

    ATTACHABLE = True
    COMMON_KEYS: ClassVar[frozenset[str]] = frozenset({"enforce"})

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.counters: dict[str, int] = {
            "calls": 0,
            "passed": 0,
            "rejected": 0,
            "held": 0,
            "would_reject": 0,
            "would_hold": 0,
        }

    @property
    def enforce(self) -> bool:
        return bool(self.config.get("enforce", True))

    @classmethod
    def common_config(
        cls, config: Mapping[str, Any], keys: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Check the parts every policy shares: a mapping, no unknown keys (when the
        engine's own ``keys`` are given), and ``enforce``; returns ``{"enforce": ...}``."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"{cls.NAME}: config must be a mapping, got {type(config).__name__}")
        if keys is not None:
            allowed = set(keys) | cls.COMMON_KEYS
            unknown = sorted(map(str, set(config) - allowed))
            if unknown:
                raise ConfigError(
                    f"{cls.NAME}: unknown config key(s) {', '.join(unknown)}; "
                    f"expected {', '.join(sorted(allowed))}"
                )
        enforce = config.get("enforce", True)
        if not isinstance(enforce, bool):
            raise ConfigError(f"{cls.NAME}: enforce: expected true or false, got {enforce!r}")
        return {"enforce": enforce}

    def on_call(self, rpc: Rpc) -> Verdict | Reject:
        return Verdict.PASS

    def on_reply(self, rpc: Rpc) -> None:
        """Observe the reply (or error) to a call of this side (send side: replies
        coming back to the app; receive side: the app's replies going out); it is
        always forwarded."""

    def matches(self, rpc: Rpc) -> bool:
        want = self.ctx.method
        if want is None or rpc.method is None:
            return want is None
        return want in (rpc.method.name, rpc.method.path, f"{rpc.method.service}/{rpc.method.name}")

    # The datapath's outbound error path: a CALL refused on the send side goes
    # back toward the app (rx_out); one refused on the receive side goes back
    # toward the network (tx_out) so the remote caller hears about it.
    def reject(self, rpc: Rpc, status: StatusCode, details: str) -> None:
        reply = rpc.error_reply(status, details)
        (self.rx_out if self.ctx.side is Side.SEND else self.tx_out).append(reply)

    def release(self, rpc: Rpc) -> None:
        """Forward a call this engine held."""
        (self.tx_out if self.ctx.side is Side.SEND else self.rx_out).append(rpc)

    def _decide(self, rpc: Rpc) -> None:
        self.counters["calls"] += 1
        try:
            verdict = self.on_call(rpc) if self.matches(rpc) else Verdict.PASS
        except WireError as e:  # the message itself is malformed (an app's bad references)
            verdict = Reject(e.status, f"{self.ctx.engine_id}: malformed request: {e}")
        except Exception as e:  # a policy bug must fail this call, never lose it
            self.ctx.log.exception("policy %s failed on call %s", self.ctx.engine_id, rpc.call_id)
            verdict = Reject(StatusCode.INTERNAL, f"policy {self.ctx.engine_id} failed: {e!r}")
            if not self.enforce:
                verdict = Verdict.PASS
        if verdict is Verdict.PASS:
            self.counters["passed"] += 1
            self.release(rpc)
        elif verdict is Verdict.HOLD:
            self.counters["held"] += 1
        elif self.enforce:
            self.counters["rejected"] += 1
            self.reject(rpc, verdict.status, verdict.details)
        else:
            self.counters["would_reject"] += 1
            self.counters["passed"] += 1
            self.ctx.log.info(
                "shadow %s: would reject %s call %s: %s",
                self.ctx.engine_id,
                rpc.method.path if rpc.method else "?",
                rpc.call_id,
                verdict.details,
            )
            self.release(rpc)

    def do_work(self) -> int:
        n = 0
        send = self.ctx.side is Side.SEND
        tx_in, tx_out, rx_in, rx_out = self.tx_in, self.tx_out, self.rx_in, self.rx_out
        while tx_in:
            rpc = tx_in.popleft()
            n += 1
            if send and rpc.kind is RpcKind.CALL:
                self._decide(rpc)
            else:
                if not send and rpc.kind is RpcKind.REPLY:  # answers a call this side decided on
                    self.on_reply(rpc)
                tx_out.append(rpc)
        while rx_in:
            rpc = rx_in.popleft()
            n += 1
            if not send and rpc.kind is RpcKind.CALL:
                self._decide(rpc)
            else:
                if send and rpc.kind is RpcKind.REPLY:
                    self.on_reply(rpc)
                rx_out.append(rpc)
        return n

    def statistics(self) -> dict[str, int | float]:
        return dict(self.counters)

    def decompose(self) -> dict[str, Any]:
        return {"counters": dict(self.counters)}

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        self.counters.update(state.get("counters", {}))


def validate_engine_class(obj: object, where: str) -> type[Engine]:
    """Check that ``obj`` implements the engine contract; raise ``TypeError`` naming the gap."""
    if not isinstance(obj, type) or not issubclass(obj, Engine):
        raise TypeError(f"{where}: ENGINE must be a subclass of mrpcd.engine.Engine, got {obj!r}")
    if not isinstance(getattr(obj, "NAME", None), str) or not obj.NAME:
        raise TypeError(f"{where}: engine class {obj.__name__} needs a NAME string")
    if not isinstance(getattr(obj, "VERSION", None), int):
        raise TypeError(f"{where}: engine class {obj.__name__} needs an integer VERSION")
    abstract: frozenset[str] = getattr(obj, "__abstractmethods__", frozenset())
    if abstract:
        raise TypeError(
            f"{where}: engine {obj.NAME!r} does not implement {', '.join(sorted(abstract))} "
            f"(expected e.g. 'def do_work(self) -> int')"
        )
    return obj
