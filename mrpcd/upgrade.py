"""Live upgrade of engines by name: new code under running applications.

How this works: ``engine_upgrade`` loads the new code as a fresh module object
(:func:`mrpcd.registry.load_fresh_engine_class`, never a cached class) and
checks it as at load. Then, for every matching engine — the policies attached
under that name, or the frontend / transport of the matching apps — it runs one
swap on that datapath's own runtime, between two ``do_work`` rounds, so no
engine runs meanwhile (that is the suspension): the old instance moves along
the lifecycle table (``upgrade``), hands over its state (``decompose``: held
calls, queues, token counts, connections, half-read frames), the new class
looks at it (``check_compatible``) and is built from it (``restore``); the
datapath binds it to the same deques (``Datapath.replace``) and the runtime
runs it instead. If the new class refuses the state or ``restore`` raises, the
old instance takes its state back (``load_state``) and resumes (``rollback``):
nothing was lost, the answer says why. ``engine_rollback`` upgrades back to the
class an engine had before its last upgrade.

Two additions (see docs/ARCHITECTURE.md, "Wire features and transport switch"):
the daemon-wide ``tcp-ingress`` is upgraded the same way on its runtime (no
datapath: the runtime's engine list only, and ``Daemon.ingress``); and a
transport may be replaced by a transport of another name (a *switch*:
``mrpcctl engine upgrade tcp --module engines.local``), when the new class
accepts the old one's state.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

from libmrpc.status import RpcError, StatusCode
from mrpcd.engine import Engine, IngressEngine, TransportEngine
from mrpcd.registry import EngineLoadError, load_fresh_engine_class

if TYPE_CHECKING:
    from mrpcd.appstate import AppState
    from mrpcd.daemon import Daemon
    from mrpcd.policy import PolicyManager

log = logging.getLogger(__name__)


class UpgradeManager:
    def __init__(self, daemon: Daemon, policies: PolicyManager) -> None:
        self.daemon = daemon
        self.policies = policies
        self.previous: dict[
            str, type[Engine]
        ] = {}  # engine id -> its class before the last upgrade
        self._lock = threading.Lock()  # one upgrade at a time

    # ------------------------------------------------------------------ targets

    def _targets(self, name: str, selector: str) -> list[tuple[AppState, Engine]]:
        """The running engines called ``name`` in the apps ``selector`` names."""
        apps = self.daemon.find_apps(selector)
        wanted = {id(a) for a in apps}
        found = [
            (app, e)
            for app, e in list(self.policies.engines.values())
            if e.NAME == name and id(app) in wanted
        ]
        for app in apps:
            dp = app.datapath
            if dp is not None and not app.closed:
                found += [(app, e) for e in (dp.frontend, dp.transport) if e.NAME == name]
        return found

    # ------------------------------------------------------------------ commands

    def upgrade(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = msg.get("engine")
        if not isinstance(name, str) or not name:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "engine upgrade needs an engine name")
        try:
            cls = load_fresh_engine_class(module=msg.get("module"), file=msg.get("file"))
        except EngineLoadError as e:
            raise RpcError(StatusCode.INVALID_ARGUMENT, f"new code refused: {e}") from None
        if cls.NAME != name and not issubclass(cls, TransportEngine):  # a switch: transports only
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"new code refused: it defines engine {cls.NAME!r}, not {name!r}",
            )
        return self._upgrade_all(name, str(msg.get("app") or "*"), lambda _eid: cls)

    def rollback(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = msg.get("engine")
        if not isinstance(name, str) or not name:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "engine rollback needs an engine name")
        return self._upgrade_all(
            name, str(msg.get("app") or "*"), lambda eid: self.previous.get(eid)
        )

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``engine_call``: an operator command to one engine's ``handle_request``."""
        engine_id = msg.get("engine_id")
        cmd = msg.get("cmd")
        if not isinstance(engine_id, str) or not isinstance(cmd, dict) or not cmd.get("op"):
            raise RpcError(StatusCode.INVALID_ARGUMENT, "engine call needs an engine id and an op")
        for app in self.daemon.find_apps("*"):
            dp, runtime = app.datapath, app.runtime
            if dp is None or runtime is None:
                continue
            for engine in list(dp.engines):
                if engine.ctx.engine_id == engine_id:
                    try:
                        result = runtime.call(functools.partial(engine.handle_request, cmd))
                    except (ValueError, KeyError, TypeError) as e:
                        raise RpcError(StatusCode.INVALID_ARGUMENT, f"{engine_id}: {e}") from None
                    return {"engine_id": engine_id, "result": result}
        raise RpcError(StatusCode.NOT_FOUND, f"no running engine {engine_id!r}; see `mrpcctl list`")

    # ------------------------------------------------------------------ the swap

    def _upgrade_all(self, name: str, selector: str, new_class: Any) -> dict[str, Any]:
        ingress = self.daemon.ingress
        if ingress is not None and name == ingress.NAME:
            return self._upgrade_ingress(ingress, new_class)
        with self._lock:
            targets = self._targets(name, selector)
            if not targets:
                raise RpcError(
                    StatusCode.NOT_FOUND,
                    f"no running engine {name!r} in apps matching {selector!r}; see `mrpcctl list`",
                )
            upgraded: list[dict[str, Any]] = []
            refused: list[dict[str, Any]] = []
            for app, old in targets:
                eid = old.ctx.engine_id
                cls = new_class(eid)
                if cls is None:
                    refused.append({"engine_id": eid, "reason": "it was never upgraded"})
                    continue
                new, reason = self._swap(app, old, cls)
                if new is None:
                    log.warning(
                        "upgrade of %s to %s v%d refused: %s", eid, name, cls.VERSION, reason
                    )
                    refused.append({"engine_id": eid, "version": old.VERSION, "reason": reason})
                    continue
                self.previous[eid] = type(old)
                with self.policies._lock:
                    if eid in self.policies.engines:
                        self.policies.engines[eid] = (app, new)
                log.info("upgraded %s from v%d to v%d", eid, old.VERSION, new.VERSION)
                upgraded.append({"engine_id": eid, "from": old.VERSION, "to": new.VERSION})
        return {"upgraded": upgraded, "refused": refused}

    def _swap(self, app: AppState, old: Engine, cls: type[Engine]) -> tuple[Engine | None, str]:
        runtime, dp = app.runtime, app.datapath
        if runtime is None or dp is None:
            return None, f"app {app.name!r} has left"

        def run() -> tuple[Engine | None, str]:
            if app.closed or old not in dp.engines:
                return None, f"app {app.name!r} has left or the engine was detached"
            if cls.NAME != old.NAME and not (
                isinstance(old, TransportEngine) and issubclass(cls, TransportEngine)
            ):
                return None, f"{cls.NAME} cannot replace {old.NAME}: only a transport switches name"
            old.lifecycle("upgrade")
            state = old.decompose()
            try:
                reason = cls.check_compatible(old.VERSION, state)
                new = None if reason else cls.restore(old.ctx, old.config, state, old.VERSION)
            except Exception as e:  # noqa: BLE001 - the new code failing is an answer
                reason, new = f"restore raised {type(e).__name__}: {e}", None
            if new is None:  # rollback: the old instance takes its state back and resumes
                old.load_state(state, old.VERSION)
                old.lifecycle("rollback")
                return (
                    None,
                    f"{cls.NAME} v{cls.VERSION} refused the state of v{old.VERSION}: {reason}",
                )
            dp.replace(old, new)
            engines = runtime.engines
            engines[engines.index(old)] = new
            return new, ""

        return runtime.call(run)

    # ------------------------------------------------------------------ the ingress

    def _upgrade_ingress(self, old: IngressEngine, new_class: Any) -> dict[str, Any]:
        """Swap the daemon-wide ingress on its runtime (rt0), as ``_swap`` does a
        datapath's engine: decompose, check, restore, or roll back."""
        with self._lock:
            eid = old.ctx.engine_id
            cls = new_class(eid)
            if cls is None:
                never = {"engine_id": eid, "reason": "it was never upgraded"}
                return {"upgraded": [], "refused": [never]}
            if not issubclass(cls, IngressEngine) or cls.NAME != old.NAME:
                raise RpcError(
                    StatusCode.INVALID_ARGUMENT,
                    f"new code refused: {cls.__name__} is not a {old.NAME} ingress engine",
                )
            runtime = self.daemon.runtimes[0]

            def run() -> tuple[Engine | None, str]:
                old.lifecycle("upgrade")
                state = old.decompose()
                try:
                    reason = cls.check_compatible(old.VERSION, state)
                    new = None if reason else cls.restore(old.ctx, old.config, state, old.VERSION)
                except Exception as e:  # noqa: BLE001 - the new code failing is an answer
                    reason, new = f"restore raised {type(e).__name__}: {e}", None
                if new is None:
                    old.load_state(state, old.VERSION)
                    old.lifecycle("rollback")
                    return None, (
                        f"{cls.NAME} v{cls.VERSION} refused the state of v{old.VERSION}: {reason}"
                    )
                new.lifecycle("attach")
                old.lifecycle("retire")
                engines = runtime.engines
                engines[engines.index(old)] = new
                self.daemon.ingress = new
                return new, ""

            new, reason = runtime.call(run)
            if new is None:
                log.warning("upgrade of %s refused: %s", eid, reason)
                refused = {"engine_id": eid, "version": old.VERSION, "reason": reason}
                return {"upgraded": [], "refused": [refused]}
            self.previous[eid] = type(old)
            log.info("upgraded %s from v%d to v%d", eid, old.VERSION, new.VERSION)
            done = {"engine_id": eid, "from": old.VERSION, "to": new.VERSION}
            return {"upgraded": [done], "refused": []}
