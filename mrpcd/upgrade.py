"""Live engine upgrade and rollback by name (``mrpcctl engine upgrade|rollback|call``).

How this works: ``upgrade`` loads the new code as a fresh module object
(``registry.load_fresh_engine_class``: never a class cached by an earlier load),
checks it as at load (the engine contract, the engine's NAME), then for every
application that matches it runs, on that application's runtime and between
two rounds of ``do_work`` (``Runtime.call``), the lifecycle table for each
engine of that name in the datapath:

    suspend   the runtime runs nothing else meanwhile: no engine of that runtime
              moves, so the swap is atomic for the datapath
    flush     implied by the round boundary: each ``do_work`` has put what it
              produced on its deques (and the transport has written its sockets);
              what an engine still holds (delay queues) travels in its state
    decompose ``Datapath.begin_upgrade``: the old instance hands its state over
    restore   ``check_compatible(prev_version, state)``, then ``restore`` builds
              the new instance from that state, with the same engine id and config
    resume    ``Datapath.commit_upgrade`` binds it to the old one's deques; it
              takes the old one's place in the runtime's engine list and the
              policy registry; the old instance is closed

When ``check_compatible`` refuses, or ``restore`` (or ``validate_config`` on the
running config) raises, the old instance takes its own state back
(``Datapath.rollback_upgrade``: ``load_state`` of what it decomposed) and resumes;
the command fails with FAILED_PRECONDITION and the reason. The class each
engine id ran before is kept, so ``rollback`` upgrades back to it (with the
current state). ``--all`` also makes the new class the one later attaches and
later applications get.

Two more cases (docs/ARCHITECTURE.md, "Wire features and transport switch"):
the daemon-wide ``tcp-ingress`` is upgraded the same way on its runtime (rt0;
no datapath: the runtime's engine list and ``Daemon.ingress``), and a transport
may be replaced by a transport of another name (a *switch*: ``mrpcctl engine
upgrade tcp --module engines.local``) when the new class accepts the old one's
state.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

from libmrpc.status import ConfigError, RpcError, StatusCode
from mrpcd.engine import Engine, EngineState, IngressEngine, TransportEngine
from mrpcd.registry import EngineLoadError, engine_source, load_fresh_engine_class

if TYPE_CHECKING:
    from mrpcd.appstate import AppState
    from mrpcd.daemon import Daemon
    from mrpcd.datapath import Datapath
    from mrpcd.policy import PolicyManager

log = logging.getLogger(__name__)

#: picks the class an engine is upgraded to (None: leave that engine alone)
Picker = Callable[[Engine], "type[Engine] | None"]


@dataclass
class Outcome:
    """What happened to one engine."""

    engine_id: str
    app: str
    from_version: int
    to_version: int
    module: str
    ok: bool
    reason: str = ""
    ms: float = 0.0  # time the runtime spent on the swap


class UpgradeManager:
    def __init__(self, daemon: Daemon, policies: PolicyManager) -> None:
        self.daemon = daemon
        self.policies = policies
        self.previous: dict[str, type[Engine]] = {}  # engine id -> the class it ran before
        self._registry_previous: dict[str, list[type[Engine]]] = {}  # name -> classes (--all)
        self._lock = threading.Lock()  # one upgrade or rollback at a time

    # ------------------------------------------------------------------ commands

    def upgrade(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = self._name(msg)
        module, file = msg.get("module") or None, msg.get("file") or None
        for key, value in (("module", module), ("file", file)):
            if value is not None and not isinstance(value, str):
                raise RpcError(StatusCode.INVALID_ARGUMENT, f"{key} must be a string")
        try:
            cls, source = load_fresh_engine_class(module=module, file=file)
        except EngineLoadError as e:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"upgrade of {name!r} refused, nothing changed: {e}",
            ) from None
        if cls.NAME != name and not issubclass(cls, TransportEngine):  # a switch: transports only
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"upgrade of {name!r} refused, nothing changed: {source} defines engine "
                f"{cls.NAME!r} ({cls.__name__}), not {name!r}",
            )
        ingress = self.daemon.ingress
        if ingress is not None and name == ingress.NAME:  # daemon-wide: --app does not apply
            with self._lock:
                outcomes = [self._swap_ingress(ingress, cls)]
            return self._answer("upgrade", name, outcomes, cls, source)
        selector = self._selector(msg)
        with self._lock:
            outcomes = self._run(name, selector, lambda _old: cls)
            persisted: str | None = (
                "an upgrade of one application lasts until the daemon restarts; "
                "upgrade with --all to keep it"
            )
            if selector == "*" and all(o.ok for o in outcomes):
                self._set_default(name, cls)
                persisted = self._persist(name, module)
        answer = self._answer("upgrade", name, outcomes, cls, source)
        if persisted is not None:
            answer["not_persisted"] = persisted
        return answer

    def rollback(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = self._name(msg)
        ingress = self.daemon.ingress
        if ingress is not None and name == ingress.NAME:
            back = self.previous.get(ingress.ctx.engine_id)
            if back is None:
                raise RpcError(
                    StatusCode.FAILED_PRECONDITION,
                    f"{name} was never upgraded: there is no previous version to return to",
                )
            with self._lock:
                outcomes = [self._swap_ingress(ingress, back)]
            return self._answer("rollback", name, outcomes, None, "")
        selector = self._selector(msg)
        with self._lock:
            outcomes = self._run(name, selector, lambda old: self.previous.get(old.ctx.engine_id))
            if not outcomes:
                raise RpcError(
                    StatusCode.FAILED_PRECONDITION,
                    f"no engine {name!r} of app {selector!r} was upgraded: there is no previous "
                    f"version to return to (see `mrpcctl list`)",
                )
            if selector == "*" and all(o.ok for o in outcomes):
                earlier = self._registry_previous.get(name)
                if earlier:
                    back = earlier.pop()
                    self._install(name, back)
                    source = engine_source(back)
                    self._persist(name, source if "/" not in source else None)
        return self._answer("rollback", name, outcomes, None, "")

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``engine_call``: an operator command for one engine's ``handle_request``."""
        engine_id, op = msg.get("engine_id"), msg.get("cmd")
        if not isinstance(engine_id, str) or not engine_id:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "engine call needs an engine id")
        if not isinstance(op, str) or not op:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "engine call needs a command (OP)")
        args = msg.get("args") or {}
        if not isinstance(args, dict):
            raise RpcError(StatusCode.INVALID_ARGUMENT, "engine call arguments must be a mapping")
        request = {**args, "op": op}
        ingress = self.daemon.ingress
        if ingress is not None and ingress.ctx.engine_id == engine_id:
            return self._handle(ingress, request, self.daemon.runtimes[0].call)
        for app in self.daemon.find_apps("*"):
            dp, runtime = app.datapath, app.runtime
            if dp is None or runtime is None:
                continue
            if any(e.ctx.engine_id == engine_id for e in list(dp.engines)):

                def run(dp: Datapath = dp) -> dict[str, Any]:
                    for e in dp.engines:  # found again on the runtime: it may have moved
                        if e.ctx.engine_id == engine_id:
                            return self._handle(e, request, lambda fn: fn())
                    raise RpcError(StatusCode.NOT_FOUND, f"engine {engine_id!r} left meanwhile")

                return runtime.call(run)
        raise RpcError(StatusCode.NOT_FOUND, f"no engine {engine_id!r}; see `mrpcctl list`")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _name(msg: dict[str, Any]) -> str:
        name = msg.get("engine")
        if not isinstance(name, str) or not name:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "name the engine (e.g. ratelimit)")
        return name

    @staticmethod
    def _selector(msg: dict[str, Any]) -> str:
        selector = msg.get("app")
        if not isinstance(selector, str) or not selector:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, "say which application: --app NAME|PID or --all"
            )
        return selector

    @staticmethod
    def _handle(
        engine: Engine, request: dict[str, Any], on: Callable[[Callable[[], Any]], Any]
    ) -> dict[str, Any]:
        try:
            answer = on(functools.partial(engine.handle_request, request))
        except (ValueError, KeyError, TypeError, ConfigError) as e:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, f"engine {engine.ctx.engine_id}: {e}"
            ) from None
        return {"engine_id": engine.ctx.engine_id, "result": answer}

    def _run(self, name: str, selector: str, pick: Picker) -> list[Outcome]:
        apps = self.daemon.find_apps(selector)
        if not apps and selector != "*":
            raise RpcError(
                StatusCode.NOT_FOUND, f"no application matches {selector!r}; see `mrpcctl list`"
            )
        outcomes: list[Outcome] = []
        for app in apps:
            runtime = app.runtime
            if runtime is None:
                continue
            try:
                outcomes += runtime.call(functools.partial(self._swap_app, app, name, pick))
            except Exception as e:  # one app's failure is reported, the others go on
                log.exception("upgrade of %s in app %r failed", name, app.name)
                outcomes.append(Outcome("?", app.name, 0, 0, "", False, f"{type(e).__name__}: {e}"))
        return outcomes

    def _swap_app(self, app: AppState, name: str, pick: Picker) -> list[Outcome]:
        """On the app's runtime: upgrade every engine ``name`` of its datapath."""
        dp = app.datapath
        if app.closed or dp is None or dp.state != "active":
            return []
        out = []
        for old in [e for e in dp.engines if e.NAME == name]:
            cls = pick(old)
            if cls is not None:
                out.append(self._swap(app, dp, old, cls))
        return out

    def _swap(self, app: AppState, dp: Datapath, old: Engine, cls: type[Engine]) -> Outcome:
        """decompose -> check_compatible -> restore -> resume, or roll back."""
        t0 = time.perf_counter()
        eid = old.ctx.engine_id
        outcome = Outcome(eid, app.name, old.VERSION, cls.VERSION, engine_source(cls), False)

        def failed(reason: str) -> Outcome:
            outcome.reason, outcome.ms = reason, round((time.perf_counter() - t0) * 1e3, 3)
            log.warning("upgrade of %s to v%d rolled back: %s", eid, cls.VERSION, reason)
            return outcome

        reason = dp.can_take(old, cls)
        if reason is not None:
            return failed(reason)
        config, reason = _running_config(cls, old)
        if config is None:
            return failed(reason or "")
        try:
            state = dp.begin_upgrade(old)
        except Exception as e:  # the old instance resumes as it was
            log.exception("decompose of %s failed", eid)
            return failed(f"v{old.VERSION} could not decompose: {type(e).__name__}: {e}")
        new, reason = _restored(cls, old, config, state)
        if new is not None:
            try:
                reason = dp.can_take(old, type(new))
                if reason is None:
                    dp.commit_upgrade(old, new)
            except Exception as e:  # noqa: BLE001 - a broken new version is rolled back
                reason = f"v{cls.VERSION} failed to restore: {type(e).__name__}: {e}"
        if reason is not None:
            if new is not None:
                _discard(new)
            try:
                dp.rollback_upgrade(old, state)
            except Exception as e:  # reported; the old instance runs anyway
                log.exception("%s could not take its state back", eid)
                reason += f"; and v{old.VERSION} could not take its state back: {e!r}"
                if old.state is EngineState.DECOMPOSED:
                    old.lifecycle("rollback")
            return failed(reason)
        assert new is not None and app.runtime is not None
        engines = app.runtime.engines  # the list the loop iterates: changed in place
        engines[engines.index(old)] = new
        self.policies.replaced(eid, app, new)
        self.previous[eid] = type(old)
        try:
            old.close()
        except Exception:  # the new instance runs; the old one's leftovers are logged
            log.exception("closing the old instance of %s failed", eid)
        outcome.ok, outcome.ms = True, round((time.perf_counter() - t0) * 1e3, 3)
        log.info(
            "upgraded %s of app %r: v%d -> v%d (%s) in %.3f ms",
            eid,
            app.name,
            old.VERSION,
            new.VERSION,
            outcome.module,
            outcome.ms,
        )
        return outcome

    def _swap_ingress(self, old: IngressEngine, cls: type[Engine]) -> Outcome:
        """Swap the daemon-wide ingress on its runtime (rt0), as ``_swap`` does a
        datapath's engine: decompose, check, restore, or roll back."""
        t0 = time.perf_counter()
        eid = old.ctx.engine_id
        outcome = Outcome(eid, "*", old.VERSION, cls.VERSION, engine_source(cls), False)
        if not issubclass(cls, IngressEngine) or cls.NAME != old.NAME:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"new code refused: {cls.__name__} is not a {old.NAME} ingress engine",
            )
        runtime = self.daemon.runtimes[0]

        def run() -> Engine | str:
            config, reason = _running_config(cls, old)
            if config is None:
                return reason or ""
            old.lifecycle("upgrade")
            state = old.decompose()
            new, reason = _restored(cls, old, config, state)
            if new is None:
                old.load_state(state, old.VERSION)
                old.lifecycle("rollback")
                return reason or ""
            new.lifecycle("attach")
            old.lifecycle("retire")
            engines = runtime.engines
            engines[engines.index(old)] = new
            self.daemon.ingress = cast(IngressEngine, new)
            return new

        got = runtime.call(run)
        outcome.ms = round((time.perf_counter() - t0) * 1e3, 3)
        if isinstance(got, str):
            outcome.reason = got
            log.warning("upgrade of %s to v%d rolled back: %s", eid, cls.VERSION, got)
            return outcome
        self.previous[eid] = type(old)
        outcome.ok = True
        log.info("upgraded %s: v%d -> v%d in %.3f ms", eid, old.VERSION, got.VERSION, outcome.ms)
        return outcome

    def _persist(self, name: str, module: str | None) -> str | None:
        """``--all`` with a module path: a restarted daemon loads ``name`` from it too.
        Returns why not (a ``--file`` lasts until the daemon restarts)."""
        if module is None:
            return (
                "an upgrade from --file lasts until the daemon restarts; install the module "
                "and upgrade with --module to keep it"
            )
        return self.policies.record_engine_module(name, module)

    def _set_default(self, name: str, cls: type[Engine]) -> None:
        """``--all``: later attaches and later applications get ``cls``."""
        old = self._install(name, cls)
        if old is not None:
            self._registry_previous.setdefault(name, []).append(old)

    def _install(self, name: str, cls: type[Engine]) -> type[Engine] | None:
        d = self.daemon
        old = d.registry.set_class(name, cls)
        if d.frontend_cls.NAME == name:
            d.frontend_cls = cls
        if d.transport_cls.NAME == name:
            d.transport_cls = cls
        return old

    @staticmethod
    def _answer(
        verb: str, name: str, outcomes: list[Outcome], cls: type[Engine] | None, source: str
    ) -> dict[str, Any]:
        bad = [o for o in outcomes if not o.ok]
        if bad:
            done = [o.engine_id for o in outcomes if o.ok]
            raise RpcError(
                StatusCode.FAILED_PRECONDITION,
                f"{verb} of {name!r} rolled back for "
                + "; ".join(f"{o.engine_id} (still v{o.from_version}): {o.reason}" for o in bad)
                + (f"; upgraded: {', '.join(done)}" if done else ""),
            )
        out: dict[str, Any] = {"engine": name, "engines": [asdict(o) for o in outcomes]}
        if cls is not None:
            out.update(version=cls.VERSION, module=source)
        return out


def _running_config(cls: type[Engine], old: Engine) -> tuple[dict[str, Any] | None, str | None]:
    """``old``'s config as the new class validates it, or why it refuses it."""
    try:
        return dict(cls.validate_config(old.config)), None
    except Exception as e:  # noqa: BLE001 - the new code's bug, reported to the operator
        return None, f"v{cls.VERSION} refuses the running config {old.config}: {e}"


def _restored(
    cls: type[Engine], old: Engine, config: dict[str, Any], state: dict[str, Any]
) -> tuple[Engine | None, str | None]:
    """The new instance built from ``old``'s state, or why there is none
    (``check_compatible`` refused, or ``restore`` raised)."""
    try:
        refusal = cls.check_compatible(old.VERSION, state)
        if refusal is not None:
            return None, f"v{cls.VERSION} refuses state of v{old.VERSION}: {refusal}"
        return cls.restore(old.ctx, config, state, old.VERSION), None
    except Exception as e:  # noqa: BLE001 - a broken new version is rolled back
        return None, f"v{cls.VERSION} failed to restore: {type(e).__name__}: {e}"


def _discard(engine: Engine) -> None:
    """A restored instance that will not run: take back what it adopted, release it."""
    try:
        engine.decompose()
        engine.close()
    except Exception:  # logged; the rollback goes on
        log.exception("discarding %s failed", engine.ctx.engine_id)
