"""Hot restart: what operators changed at runtime carries over to the new process.

To an operator a hot restart is the same daemon, so besides the apps (their
policies with ``hotrestart_state``) the new process takes over:

* the next policy engine id, so ids stay unique, and every attached engine
  keeps its id (``mrpcctl policy set``/``engine call`` scripts go on working),
  every standing rule made at runtime its rule id (``--transient`` ones too);
* engines upgraded for every app (``engine upgrade NAME --all``: the class later
  apps get), and for one app its upgraded classes (``engine upgrade --app``, a
  transport switch ``tcp`` -> ``local``): the same module, loaded again (fresh,
  as an upgrade loads it) from the code installed now;
* the class each upgraded engine ran before, so ``engine rollback`` still works;
* the values of the metrics registry: Prometheus counters continue, with the
  same label sets, instead of dropping to 0.

:func:`collect` runs in the old process (a part of the ``state`` document);
:func:`apply_before` before the apps are restored, :func:`apply_after` after.
"""

from __future__ import annotations

import copy
import itertools
import logging
import sys
from typing import TYPE_CHECKING, Any

from mrpcd.engine import Side
from mrpcd.registry import EngineLoadError, engine_source, load_fresh_engine_class

if TYPE_CHECKING:
    from mrpcd.daemon import Daemon
    from mrpcd.engine import Engine

log = logging.getLogger(__name__)
_loaded: dict[str, type[Any]] = {}  # source -> class, loaded once per process


def collect(daemon: Daemon) -> dict[str, Any]:
    operator: Any = daemon.operator
    if operator is None:
        return {}
    policies, upgrades, registry = operator.policies, operator.upgrades, daemon.registry
    modules = {}
    for name, cls in list(registry._classes.items()):
        source = engine_source(cls)
        if source != registry.modules.get(name):
            modules[name] = source
    return {
        "next_policy_id": next(copy.copy(policies._ids)),  # a copy: the old one may go on
        "engine_modules": modules,
        "previous": {  # the ingress (daemon/...) is built from the config again
            eid: [cls.NAME, engine_source(cls)]
            for eid, cls in list(upgrades.previous.items())
            if not eid.startswith("daemon/")
        },
        "metrics": export_samples(daemon.services.metrics_registry),
        "rules": [  # standing rules made at runtime (--all --future), by their ids
            [r.rule_id, r.engine, r.selector, r.side.value, r.method, r.config, r.record_id]
            for r in list(policies.standing.values())
            if r.rule_id.startswith("rule-")
        ],
    }


def engine_class(daemon: Daemon, name: str, source: str) -> type[Engine]:
    """The class engine ``name`` ran from ``source`` in the old process: the one
    the registry has when it is that module, else that module loaded fresh (as
    ``engine upgrade --module``/``--file`` loads it). Raises EngineLoadError."""
    try:
        cls = daemon.registry.get(name)
    except EngineLoadError:
        cls = None
    if cls is not None and engine_source(cls) == source:
        return cls
    if source not in _loaded:
        file = source if "/" in source else None
        _loaded[source] = load_fresh_engine_class(module=None if file else source, file=file)[0]
    return _loaded[source]


def apply_before(daemon: Daemon, doc: dict[str, Any]) -> None:
    """Before the apps are restored: the id counter and the ``--all`` upgrades."""
    operator: Any = daemon.operator
    if not doc or operator is None:
        return
    operator.policies._ids = itertools.count(int(doc["next_policy_id"]))
    _standing_rules(operator.policies, doc.get("rules", []))
    for name, source in doc.get("engine_modules", {}).items():
        try:
            cls = engine_class(daemon, name, source)
        except EngineLoadError as e:
            log.warning("hot restart: engine %r is back to its configured code: %s", name, e)
            continue
        operator.upgrades._install(name, cls)


def _standing_rules(manager: Any, rules: list[list[Any]]) -> None:
    """The runtime standing rules under their ids: a recorded one came back from the
    record under its entry id (renamed), a ``--transient`` one is made again."""
    from mrpcd.policy import Standing

    for rule_id, engine, selector, side, method, config, record_id in rules:
        rule = manager.standing.pop(record_id, None) if record_id else None
        if rule is None:
            spec = {"engine": engine, "side": side, "method": method, "config": config}
            try:
                manager._prepare(spec)
            except Exception as e:  # noqa: BLE001 - one rule lost is logged, not fatal
                log.warning("hot restart: standing rule %s not made again: %s", rule_id, e)
                continue
            rule = Standing(rule_id, engine, selector, Side(side), method, dict(config))
        rule.rule_id = rule_id
        manager.standing[rule_id] = rule


def apply_after(daemon: Daemon, doc: dict[str, Any]) -> None:
    """After the apps are restored: rollback targets and the metrics' values."""
    operator: Any = daemon.operator
    if not doc or operator is None:
        return
    previous = operator.upgrades.previous
    for eid, (name, source) in doc.get("previous", {}).items():
        try:
            previous[eid] = engine_class(daemon, name, source)
        except EngineLoadError as e:
            log.warning("hot restart: %s cannot be rolled back any more: %s", eid, e)
    registry, samples = daemon.services.metrics_registry, doc.get("metrics", [])
    try:
        if registry is not None and samples and not hasattr(registry, "_mrpc_families"):
            _register_families(daemon, registry)  # detached since: its series stay
        import_samples(registry, samples)
    except Exception as e:  # noqa: BLE001 - the metrics start from 0, the daemon serves
        log.warning("hot restart: the metrics' values did not carry over: %s", e)


def _register_families(daemon: Daemon, registry: Any) -> None:
    """The ``metrics`` engine's metric families in ``registry`` (by its configured
    module, as the daemon loads every engine) although no such policy is attached."""
    cls = daemon.registry.get("metrics")
    families = getattr(sys.modules.get(cls.__module__), "families", None)
    if families is not None:
        families(registry)


def export_samples(registry: Any) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus registry as plain data (none without one)."""
    if registry is None:
        return []
    return [(s.name, dict(s.labels), float(s.value)) for f in registry.collect() for s in f.samples]


def import_samples(registry: Any, samples: list[tuple[str, dict[str, str], float]]) -> None:
    """Set the new registry's metrics to the old one's values (counters, gauges,
    histograms; their ``_created`` times too, so no reset shows)."""
    if registry is None or not samples:
        return
    named = registry._names_to_collectors
    buckets: dict[int, tuple[Any, list[tuple[float, float]]]] = {}  # id(child) -> cumulative
    for name, labels, value in samples:
        collector = named.get(name)
        if collector is None:
            continue
        kind = collector._type
        le = labels.pop("le", None)
        child = collector.labels(**labels) if labels else collector
        if name.endswith("_created"):
            child._created = value
        elif kind == "histogram" and name.endswith("_bucket") and le is not None:
            buckets.setdefault(id(child), (child, []))[1].append((float(le), value))
        elif kind == "histogram" and name.endswith("_sum"):
            child._sum.set(value)
        elif kind in ("counter", "gauge") and not name.endswith("_count"):
            child._value.set(value)
    for child, cumulative in buckets.values():
        below = 0.0
        for i, (_le, total) in enumerate(sorted(cumulative)):
            if i < len(child._buckets):
                child._buckets[i].set(total - below)
            below = total
