"""Attaching, detaching and reconfiguring policy engines by name, at runtime.

Every change is all-or-nothing: the engine is loaded and its config validated
before any datapath changes; a splice runs on the datapath's runtime between
two rounds (see mrpcd.datapath), so in-flight RPCs are never dropped.

Standing rules (``--all`` with ``future``, and ``policies:`` in the daemon
config) are applied to every application that registers later too.

Runtime changes are recorded under the prefix (mrpcd.persist) unless attached
``transient``; at start the record's entries become standing rules (ids ``pN``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from libmrpc.status import ConfigError, RpcError, StatusCode
from mrpcd.engine import Engine, EngineContext, Side
from mrpcd.persist import RECORD_NAME, Entry, PolicyRecord
from mrpcd.registry import EngineLoadError, load_engine_class

if TYPE_CHECKING:
    from mrpcd.appstate import AppState
    from mrpcd.daemon import Daemon
    from mrpcd.datapath import Datapath

log = logging.getLogger(__name__)


def _engine_rows(dp: Datapath) -> list[dict[str, Any]]:
    return [
        {"engine_id": e.ctx.engine_id, "engine": e.NAME, "stats": e.statistics()}
        for e in dp.engines
    ]


@dataclass
class Standing:
    rule_id: str
    engine: str
    selector: str
    side: Side
    method: str | None
    config: dict[str, Any]
    engine_ids: list[str] = field(default_factory=list)
    record_id: str | None = None  # its entry in the policy record (mrpcd.persist)
    record_kind: str | None = None  # that entry's kind: "app" or "rule"


class PolicyManager:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.engines: dict[str, tuple[AppState, Engine]] = {}
        self.standing: dict[str, Standing] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        for i, p in enumerate(daemon.config.policies):
            spec = {
                "engine": p.engine,
                "app": p.app,
                "side": p.side,
                "method": p.method,
                "config": dict(p.config),
                "future": True,
            }
            try:
                self._prepare(spec)
            except RpcError as e:
                raise ConfigError(f"policies[{i}]: {e.details()}") from None
            self.standing[f"config-{i + 1}"] = self._standing(f"config-{i + 1}", spec)
        # --- persisted policies (mrpcd.persist) ---
        self.record = PolicyRecord(
            daemon.prefix / RECORD_NAME, enabled=daemon.config.persist_policies
        )
        self._recorded: dict[str, str] = {}  # engine_id -> record entry ("app" kind) it came from
        self._restore()

    def handler(self, op: Any) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        return {
            "policy_attach": self.attach,
            "policy_detach": self.detach,
            "policy_set": self.set,
            "stats": self.stats,
            "policy_rules": self.rules,
            "policy_list": self.list_persisted,
        }.get(op)

    def metrics_registry(self) -> Any:
        """The registry every ``metrics`` engine of this daemon fills (None without prometheus_client)."""
        return self.daemon.services.metrics_registry

    # ------------------------------------------------------------------ helpers

    def _prepare(
        self, msg: dict[str, Any]
    ) -> tuple[type[Engine], dict[str, Any], Side, str | None]:
        name = msg.get("engine")
        if not isinstance(name, str) or not name:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "policy attach needs an engine name")
        try:
            cls = self.daemon.registry.get(name)
        except EngineLoadError as e:
            raise RpcError(StatusCode.NOT_FOUND, str(e)) from None
        if not cls.ATTACHABLE:  # frontends, transports: decided by class, not by name
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, f"{name!r} is always on; it is not a policy"
            )
        try:
            side = Side(msg.get("side") or "send")
        except ValueError:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"side must be 'send' or 'receive', got {msg.get('side')!r}",
            ) from None
        config = msg.get("config") or {}
        if not isinstance(config, dict):
            raise RpcError(StatusCode.INVALID_ARGUMENT, "policy config must be a mapping")
        try:
            checked = dict(cls.validate_config(config))
        except ConfigError as e:
            raise RpcError(StatusCode.INVALID_ARGUMENT, f"bad config for {name}: {e}") from None
        method = msg.get("method")
        if method is not None and not isinstance(method, str):
            raise RpcError(StatusCode.INVALID_ARGUMENT, "method must be a string")
        return cls, checked, side, method

    def _standing(self, rule_id: str, msg: dict[str, Any]) -> Standing:
        return Standing(
            rule_id,
            msg["engine"],
            str(msg.get("app") or "*"),
            Side(msg.get("side") or "send"),
            msg.get("method"),
            dict(msg.get("config") or {}),
        )

    def _attach_to(
        self,
        app: AppState,
        cls: type[Engine],
        config: dict[str, Any],
        side: Side,
        method: str | None,
    ) -> str:
        runtime = app.runtime
        assert runtime is not None and app.datapath is not None
        with self._lock:
            engine_id = f"{app.name}/{cls.NAME}-{next(self._ids)}"
        ctx = EngineContext(
            engine_id,
            app.name,
            app.pid,
            self.daemon.clock,
            side=side,
            method=method,
            log=logging.getLogger(f"mrpcd.policy.{cls.NAME}"),
            runtime_local=runtime.local,
            services=self.daemon.services,
            port=app,
            poller=runtime.poller,
            wake=runtime.wake_soon,
        )
        engine = cls(ctx, config)

        def splice() -> None:
            dp = app.datapath
            if app.closed or dp is None:
                raise RpcError(StatusCode.NOT_FOUND, f"app {app.name!r} left before the attach")
            dp.insert(engine)
            rt_engines = runtime.engines
            rt_engines.insert(rt_engines.index(dp.transport), engine)

        runtime.call(splice)
        with self._lock:
            self.engines[engine_id] = (app, engine)
        log.info(
            "attached %s (%s side%s) to app %r",
            engine_id,
            side.value,
            f", method {method}" if method else "",
            app.name,
        )
        return engine_id

    # ------------------------------------------------------------------ commands

    def attach(self, msg: dict[str, Any]) -> dict[str, Any]:
        cls, config, side, method = self._prepare(msg)
        selector = str(msg.get("app") or "")
        if not selector:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, "say which application: --app NAME|PID or --all"
            )
        apps = self.daemon.find_apps(selector)
        future = bool(msg.get("future"))
        if not apps and not future:
            raise RpcError(
                StatusCode.NOT_FOUND,
                f"no application matches {selector!r}; "
                f"see `mrpcctl list` (or use --all --future for apps that come later)",
            )
        ids = [self._attach_to(app, cls, config, side, method) for app in apps]
        result: dict[str, Any] = {"engine_ids": ids}
        rule = None
        if future:
            rule_id = f"rule-{next(self._ids)}"
            rule = self._standing(rule_id, dict(msg, side=side.value, config=config))
            rule.engine_ids.extend(ids)
            self.standing[rule_id] = rule
            result["rule_id"] = rule_id
        result.update(self._record_attach(msg, selector, list(zip(apps, ids)), config, rule))
        return result

    def _find(self, msg: dict[str, Any]) -> list[tuple[str, AppState, Engine]]:
        engine_id = msg.get("engine_id")
        with self._lock:
            if engine_id:
                if engine_id in self.engines:
                    app, engine = self.engines[engine_id]
                    return [(engine_id, app, engine)]
                raise RpcError(
                    StatusCode.NOT_FOUND, f"no attached engine {engine_id!r}; see `mrpcctl list`"
                )
            app_sel, name = msg.get("app"), msg.get("engine")
            found = [
                (eid, a, e)
                for eid, (a, e) in self.engines.items()
                if (not name or e.NAME == name)
                and (app_sel in ("*", None) or app_sel in (a.name, str(a.pid)))
            ]
        if not found:
            raise RpcError(
                StatusCode.NOT_FOUND, f"no attached engine matches app={app_sel!r} engine={name!r}"
            )
        return found

    def detach(self, msg: dict[str, Any]) -> dict[str, Any]:
        rule_id = msg.get("rule_id")
        if rule_id:
            rule = self.standing.pop(rule_id, None)
            record_id = rule.record_id if rule else rule_id  # a skipped record entry: by its id
            unrecorded = self._unrecord(record_id) if record_id else None
            if rule is None and unrecorded is None:
                raise RpcError(StatusCode.NOT_FOUND, f"no standing rule {rule_id!r}")
            result: dict[str, Any] = {"detached": [], "rule_removed": rule_id}
            return result | ({"unrecorded": unrecorded} if unrecorded else {})
        detached = []
        for engine_id, app, engine in self._find(msg):
            runtime = app.runtime
            assert runtime is not None

            def unsplice(
                app: AppState = app,
                engine: Engine = engine,
                runtime: Any = runtime,
                engine_id: str = engine_id,
            ) -> int:
                engine = self._current(engine_id, engine)  # a live upgrade may have replaced it
                moved = 0
                if app.datapath is not None and engine in app.datapath.policies:
                    moved = app.datapath.remove(engine)
                runtime.remove_engine(engine)
                engine.close()
                return moved

            moved = runtime.call(unsplice)
            with self._lock:
                self.engines.pop(engine_id, None)
            row: dict[str, Any] = {"engine_id": engine_id, "handed_on": moved}
            if unrecorded := self._unrecord(self._recorded.pop(engine_id, None)):
                row["unrecorded"] = unrecorded  # its entry in the record is gone too
            detached.append(row)
            log.info(
                "detached %s from app %r (%d queued items handed on)", engine_id, app.name, moved
            )
        return {"detached": detached}

    def set(self, msg: dict[str, Any]) -> dict[str, Any]:
        config = msg.get("config")
        if not isinstance(config, dict) or not config:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "policy set needs key=value pairs")
        targets = self._find(msg)
        for _eid, _app, engine in targets:  # all or nothing: check everything first
            merged = dict(engine.config)
            merged.update(config)
            try:
                engine.validate_config(merged)
            except ConfigError as e:
                raise RpcError(
                    StatusCode.INVALID_ARGUMENT, f"bad config for {engine.ctx.engine_id}: {e}"
                ) from None
        for eid, app, engine in targets:
            assert app.runtime is not None
            app.runtime.call(functools.partial(self._update, eid, engine, config))
        current = {t[0]: self._current(t[0], t[2]) for t in targets}
        recorded = [r for eid, engine in current.items() if (r := self._record_set(eid, engine))]
        return {
            "updated": [t[0] for t in targets],
            "config": {eid: engine.config for eid, engine in current.items()},
            "recorded": recorded,
            "not_recorded": self._unrecorded_set(current, recorded),
        }

    def _unrecorded_set(self, current: dict[str, Engine], recorded: list[str]) -> dict[str, str]:
        """Why a ``policy set`` of these engines will not survive a restart."""
        with self._lock:
            kept = {eid for eid in current if self._recorded.get(eid) in recorded}
        if not self.record.enabled:
            return {eid: "persist_policies is off" for eid in current}
        return {
            eid: "it was attached --transient, by a --future rule or by the config's "
            "policies: a restart gives it the rule's config (to change a rule, detach it "
            "with `policy detach --rule ID` and attach it again)"
            for eid in current
            if eid not in kept
        }

    def stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        out = []
        for app in self.daemon.find_apps("*"):
            runtime, dp = app.runtime, app.datapath
            if runtime is None or dp is None:
                continue
            try:
                rows = runtime.call(functools.partial(_engine_rows, dp))
            except Exception as e:  # noqa: BLE001 - one app's failure is shown in its row, not raised
                rows = [{"error": str(e)}]
            out.append({"app": app.name, "pid": app.pid, "engines": rows})
        return {
            "apps": out,
            "ingress": self.daemon.ingress.statistics() if self.daemon.ingress else {},
        }

    def rules(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "rules": [
                {
                    "rule_id": r.rule_id,
                    "engine": r.engine,
                    "app": r.selector,
                    "side": r.side.value,
                    "method": r.method,
                    "config": r.config,
                    "engine_ids": r.engine_ids,
                }
                for r in self.standing.values()
            ]
        }

    def _update(self, engine_id: str, engine: Engine, config: dict[str, Any]) -> None:
        self._current(engine_id, engine).update_config(config)

    def _current(self, engine_id: str, engine: Engine) -> Engine:
        """The instance running as ``engine_id`` now (on its runtime: an upgrade swaps there)."""
        with self._lock:
            found = self.engines.get(engine_id)
        return found[1] if found is not None else engine

    def replaced(self, engine_id: str, app: AppState, engine: Engine) -> None:
        """A live upgrade put ``engine`` in the place of the attached engine ``engine_id``."""
        with self._lock:
            if engine_id in self.engines:
                self.engines[engine_id] = (app, engine)

    # ------------------------------------------------------------------ app hooks

    def app_registered(self, app: AppState) -> None:
        for rule in list(self.standing.values()):
            if rule.selector not in ("*", app.name, str(app.pid)):
                continue
            try:
                cls, config, side, method = self._prepare(
                    {
                        "engine": rule.engine,
                        "side": rule.side.value,
                        "method": rule.method,
                        "config": rule.config,
                    }
                )
                engine_id = self._attach_to(app, cls, config, side, method)
                rule.engine_ids.append(engine_id)
                if rule.record_kind == "app" and rule.record_id:
                    with self._lock:
                        self._recorded[engine_id] = rule.record_id
            except Exception:
                log.exception("standing rule %s failed for app %r", rule.rule_id, app.name)

    def app_left(self, app: AppState) -> None:
        with self._lock:
            for eid in [eid for eid, (a, _) in self.engines.items() if a is app]:
                del self.engines[eid]
                self._recorded.pop(eid, None)  # the record keeps the entry, for the app's name

    # ------------------------------------------------------------------ persisted policies

    def _restore(self) -> None:
        """Make the record's entries standing rules; skip (and keep) those no longer valid."""
        entries = self.record.load()
        for name, module in self.record.engine_modules.items():
            self._use_engine_module(name, module)
        for entry in entries:
            spec = {
                "engine": entry.engine,
                "app": entry.app,
                "side": entry.side,
                "method": entry.method,
                "config": entry.config,
            }
            try:
                _cls, config, side, _method = self._prepare(spec)
            except RpcError as e:
                entry.skipped = e.details()
                log.warning(
                    "persisted policy %s skipped: %s; it stays recorded (remove it with "
                    "`mrpcctl policy detach --rule %s`)",
                    entry.describe(),
                    e.details(),
                    entry.id,
                )
                continue
            rule = self._standing(entry.id, dict(spec, side=side.value, config=config))
            rule.record_id, rule.record_kind = entry.id, entry.kind
            self.standing[entry.id] = rule
            log.info("persisted policy %s restored as a standing rule", entry.describe())

    def _use_engine_module(self, name: str, module: str) -> None:
        registry = self.daemon.registry
        if registry.modules.get(name) == module:
            return
        try:
            load_engine_class(module, name=name)
        except EngineLoadError as e:
            log.warning("recorded upgrade of engine %r not used: %s", name, e)
            return
        registry.modules[name] = module
        registry._classes.pop(name, None)
        log.info("engine %r runs from %s (recorded by an upgrade)", name, module)

    def record_engine_module(self, name: str, module: str) -> str | None:
        """Hook for ``mrpcctl engine upgrade``: record that ``name`` now runs from ``module``.

        Returns None, or why it was not recorded (the upgrade itself stands)."""
        if not self.record.enabled:
            return "persist_policies is off in the daemon config"
        try:
            self.record.record_engine_module(name, module)
        except OSError as e:
            return self._write_failed(e)
        return None

    def _write_failed(self, e: OSError) -> str:
        why = (
            f"cannot write {self.record.path}: {e.strerror or e}; the change is in effect "
            f"but will not survive a restart"
        )
        log.error("%s", why)
        return why

    def _record_attach(
        self,
        msg: dict[str, Any],
        selector: str,
        attached: list[tuple[AppState, str]],
        config: dict[str, Any],
        rule: Standing | None,
    ) -> dict[str, Any]:
        if msg.get("transient"):
            return {"persisted": [], "transient": True}
        if not self.record.enabled:
            return {
                "persisted": [],
                "not_persisted": "persist_policies is off in the daemon config",
            }
        by_name = selector == "*" or any(a.name == selector for a, _ in attached)
        by_name |= not attached and not selector.isdigit() and not selector.startswith("#")
        common: dict[str, Any] = {
            "engine": str(msg["engine"]),
            "side": Side(msg.get("side") or "send").value,
            "method": msg.get("method"),
            "config": config,
        }
        out: list[dict[str, Any]] = []
        try:
            if rule is not None:
                if not by_name:
                    return {
                        "persisted": [],
                        "not_persisted": f"a standing rule for {selector!r} (a pid or app id) "
                        f"cannot survive a restart; attach by app name to record it",
                    }
                entry = self.record.add("rule", selector, **common)
                rule.record_id, rule.record_kind = entry.id, entry.kind
                out.append({"id": entry.id, "kind": "rule", "app": selector})
            else:
                pid = int(selector) if not by_name and selector.isdigit() else None
                entries: dict[str, Entry] = {}
                for app, engine_id in attached:
                    if app.name not in entries:
                        entries[app.name] = self.record.add(
                            "app", app.name, attached_by_pid=pid, **common
                        )
                        note = "recorded by app name" + (
                            f" (attached by pid {pid}; pids change across restarts)"
                            if pid is not None
                            else ""
                        )
                        out.append(
                            {
                                "id": entries[app.name].id,
                                "kind": "app",
                                "app": app.name,
                                "note": note,
                            }
                        )
                    with self._lock:
                        self._recorded[engine_id] = entries[app.name].id
        except OSError as e:
            return {"persisted": out, "not_persisted": self._write_failed(e)}
        return {"persisted": out}

    def _record_set(self, engine_id: str, engine: Engine) -> str | None:
        with self._lock:
            record_id = self._recorded.get(engine_id)
        if record_id is None:
            return None
        rule = self.standing.get(record_id)
        if rule is not None and rule.record_id == record_id:
            rule.config = dict(engine.config)  # apps registering later get the new config
        try:
            self.record.update_config(record_id, dict(engine.config))
        except OSError as e:
            self._write_failed(e)
            return None
        return record_id

    def _unrecord(self, record_id: str | None) -> str | None:
        """Remove an entry from the record (and its restored rule); its id if it was there."""
        if record_id is None:
            return None
        rule = self.standing.get(record_id)
        if rule is not None and rule.record_id == record_id:
            del self.standing[record_id]
        try:
            entry = self.record.remove(record_id)
        except OSError as e:
            self._write_failed(e)
            return None
        if entry is not None:
            log.info("persisted policy %s removed from the record", entry.describe())
        return entry.id if entry else None

    def list_persisted(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.record.describe()
