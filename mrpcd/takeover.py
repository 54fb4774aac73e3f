"""Hot restart, the new process's side: load, restore what the old daemon handed over, serve.

Imported fresh (from the code installed now) in the process the old daemon
forked (``mrpcd/hotrestart.py``). :func:`child_main` catches signals, empties
the old generation's objects (``mrpcd/oldworld.py``), loads the config anew, binds
the apps' schemas and says ``loaded``; then it receives the quiesced state
(``mrpcd/hotrestart_state.py`` describes the document), closes every descriptor
it inherited by the fork and does not need, rebuilds the daemon from the
document (:func:`restore`; nothing shared is read or written yet), says
``restored``, and on ``commit`` starts serving and tells systemd
``MAINPID=<pid>`` and ``READY=1``. If anything fails it says ``error`` with the
reason and exits: the old daemon rolls back.

Test hook: ``MRPC_TEST_FAIL_TAKEOVER=load`` or ``=restore`` (in the old daemon's
environment) makes the new process fail at that step, ``=hang`` makes it hang
while loading, so tests can check the rollback; ``MRPC_TEST_PAUSE_TAKEOVER=STEP[:SECONDS]``
(``load``, ``restore``: before the restore, ``commit``: after the commit, before
serving) makes it pause there (2 s), so tests can act in that window. Read
nowhere else.
"""

from __future__ import annotations

import itertools
import logging
import os
import resource
import socket
import time
from typing import Any

from libmrpc._heap import Heap
from libmrpc._shm import DaemonRegions, ShmLayout
from libmrpc.status import LocalError
from mrpcd import hotrestart_operator, oldworld
from mrpcd.appstate import AppState, ServiceOwner
from mrpcd.binding import BindingCache
from mrpcd.config import Config, load_config
from mrpcd.control_loop import AppConn
from mrpcd.daemon import Daemon
from mrpcd.engine import Binding, ConnSpec
from mrpcd.gcwatch import freeze_startup_objects
from mrpcd.handover import HandoverError, check_peer, recv_doc, send_doc
from mrpcd.hotrestart import Inherited, _is_open
from mrpcd.hotrestart_calls import (
    CALLS_VERSIONS,
    UnknownCallsFormat,
    check_version,
    import_served,
)
from mrpcd.notify import Notifier
from mrpcd.operator import OperatorHandler
from mrpcd.registry import EngineLoadError, EngineRegistry, engine_source
from mrpcd.services import Claimant

log = logging.getLogger(__name__)
TEST_HOOK = "MRPC_TEST_FAIL_TAKEOVER"
PAUSE_HOOK = "MRPC_TEST_PAUSE_TAKEOVER"


class TakeoverFailed(Exception):
    pass


def child_main(
    old_world: tuple[Any, dict[str, Any]],
    fd: int,
    inherited: set[int],
    options: dict[str, Any],
    notify: tuple[str | None, int],
) -> int:
    """The forked process's life; returns its exit status."""
    from mrpcd.cli import Signals, serve

    caught = Signals()  # first: a signal from now on is handled once we serve
    sock = socket.socket(fileno=fd)  # inherited, kept: no descriptor is opened here
    priority = _yield_cpu()
    try:
        old_daemon = oldworld.keep(old_world[0])  # the regions' mappings, the schema texts
        released = oldworld.release(old_world)  # before any descriptor is received or opened
        inherited = {n for n in inherited if _is_open(n)}  # old objects closed their copies
        log.debug("hot restart: the old generation's objects released: %s", released)
        check_peer(sock, os.getppid())
        deadline = time.monotonic() + 60.0
        listeners, listener_fds = recv_doc(sock, deadline)
        if listeners.get("msg") != "listeners":
            raise HandoverError(f"expected the listeners, got {listeners.get('msg')!r}")
        config, bindings = _load(old_daemon, options)
        daemon = prebuild(config, listeners, listener_fds, bindings)
        freeze_startup_objects()  # no app restored yet: their state stays collectable
        send_doc(sock, {"msg": "loaded", "calls_versions": list(CALLS_VERSIONS)})
        deadline = time.monotonic() + config.restart_timeout
        state, fds = recv_doc(sock, deadline)
        t0 = time.monotonic()
        _restore_priority(priority)  # calls wait on us from here on
        if state.get("msg") != "state":
            raise HandoverError(f"expected the state, got {state.get('msg')!r}")
        _close_inherited(inherited, keep={fd})
        _hook("restore")
        hotrestart_operator.apply_before(daemon, state.get("operator") or {})
        restore(daemon, state, fds, old_daemon)
        hotrestart_operator.apply_after(daemon, state.get("operator") or {})
        send_doc(sock, {"msg": "restored"})
        t1 = time.monotonic()
    except Exception as e:
        if isinstance(e, TakeoverFailed | HandoverError | OSError):
            log.error("hot restart: the new mrpcd (pid %d) cannot take over: %s", os.getpid(), e)
        else:  # a bug in the new code: the old process serves on; show where
            log.exception("hot restart: the new mrpcd (pid %d) failed to restore", os.getpid())
        try:
            send_doc(sock, {"msg": "error", "reason": str(e) or type(e).__name__})
        except OSError:
            pass
        return 1
    try:
        go, _ = recv_doc(sock, time.monotonic() + config.restart_timeout)
    except HandoverError as e:
        log.error("hot restart: the old mrpcd did not commit (%s); the new one exits", e)
        return 1
    if go.get("msg") != "commit":
        return 1
    from_pid = state["from_pid"]
    # this frame stays on the stack below serve() for the process's life (and below
    # the next hot restart's): it must not hold the hand-over's documents
    del state, fds, listeners, listener_fds, old_daemon, go
    _hook("commit")
    daemon._go()
    try:
        send_doc(sock, {"msg": "serving", "pid": os.getpid()})  # mrpcd.json is ours now
    except OSError:
        pass
    sock.close()
    notifier = Notifier(notify[0], notify[1])
    daemon.notifier = notifier
    log.info(
        "hot restart: took over from pid %d (restored in %.1f ms, serving %.1f ms after the state arrived)",
        from_pid,
        (t1 - t0) * 1e3,
        (time.monotonic() - t0) * 1e3,
    )
    serve(
        daemon,
        notifier,
        config,
        options["config_path"],
        options["overrides"],
        takeover=True,
        caught=caught,
    )
    return 0


def _yield_cpu() -> int | None:
    """Load at a lower priority, so that the old daemon (and its apps) keep the CPU
    while this process imports and binds; only when the priority can be restored
    (root, or RLIMIT_NICE: the unit's ``LimitNICE=+0``). Returns the priority to restore."""
    try:
        now = os.getpriority(os.PRIO_PROCESS, 0)
        soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
        if os.geteuid() != 0 and soft != resource.RLIM_INFINITY and 20 - soft > now:
            return None  # could not come back
        os.setpriority(os.PRIO_PROCESS, 0, min(19, now + 10))
    except OSError:
        return None
    return now


def _restore_priority(priority: int | None) -> None:
    if priority is None:
        return
    try:
        os.setpriority(
            os.PRIO_PROCESS, 0, priority
        )  # this thread; the threads it starts inherit it
    except OSError as e:
        log.warning("hot restart: cannot restore the priority %d: %s", priority, e)


def _hook(step: str) -> None:
    pause = os.environ.get(PAUSE_HOOK, "").split(":")
    if pause[0] == step:
        seconds = float(pause[1]) if len(pause) > 1 else 2.0
        log.info("%s: the new mrpcd pauses %.1f s at %s (a test hook)", PAUSE_HOOK, seconds, step)
        time.sleep(seconds)
    if os.environ.get(TEST_HOOK) == "hang" and step == "load":
        time.sleep(3600)  # the old process times out and kills us
    if os.environ.get(TEST_HOOK) == step:
        raise TakeoverFailed(f"{TEST_HOOK}={step} (a test hook) makes this step fail")


def _load(old_daemon: Any, options: dict[str, Any]) -> tuple[Config, BindingCache]:
    """The slow part, before the old daemon stops anything: config, code, schemas."""
    try:
        config = load_config(
            options["config_path"] or os.environ.get("MRPC_CONFIG"), overrides=options["overrides"]
        )
    except LocalError as e:
        raise TakeoverFailed(f"the config does not load: {e}") from None
    logging.getLogger().setLevel(config.log_level.upper())
    registry = EngineRegistry(config.engines)
    for name in config.engines:
        registry.get(name)  # import every configured engine now
    bindings = BindingCache(config.cache_dir, config.schema)
    for app in list(old_daemon.apps.values()):
        for texts in list(app.schema_texts):
            bindings.bind(texts)
    _hook("load")
    return config, bindings


def _close_inherited(inherited: set[int], keep: set[int]) -> None:
    """Close what the fork copied: the old daemon's descriptors (the ones the new
    one needs came again by SCM_RIGHTS). Kept: stdio, the hand-over socket and
    the memfds behind the inherited mappings of the apps' regions."""
    for n in sorted(inherited):
        if n <= 2 or n in keep:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            continue
        try:
            os.close(n)
        except OSError:
            pass


def prebuild(config: Config, doc: dict[str, Any], fds: list[int], bindings: BindingCache) -> Daemon:
    """The daemon on the old one's lock and listeners, with no app yet and no thread
    (built while the old daemon still serves)."""

    def sock(i: int) -> socket.socket:
        return socket.socket(fileno=fds[i])

    inherited = Inherited(
        fds[doc["lock"]], sock(doc["listener"]), sock(doc["app_listener"]), sock(doc["op_listener"])
    )
    daemon = Daemon(config, inherited)
    daemon.bindings = bindings
    daemon.operator = OperatorHandler(daemon)
    if doc.get("metrics_listener") is not None:
        daemon.operator.inherited_metrics = sock(doc["metrics_listener"])
    daemon._make_ingress()
    return daemon


def restore(daemon: Daemon, state: dict[str, Any], fds: list[int], old_daemon: Any) -> None:
    """Give the prebuilt daemon everything of the handed-over ``state``; starts no thread."""

    def sock(i: int) -> socket.socket:
        return socket.socket(fileno=fds[i])

    assert daemon.operator is not None
    try:
        check_version(state.get("calls"))
    except UnknownCallsFormat as e:
        raise TakeoverFailed(str(e)) from None
    daemon._app_ids = itertools.count(int(state["next_app_id"]))
    with daemon.router.lock:
        for svc, uid, app_name, pid, app_id, since in state["owners"]:
            daemon.router.owners[svc] = ServiceOwner(uid, app_name, pid, app_id, since)
    for doc in state["apps"]:
        app = _restore_app(daemon, doc, fds, old_daemon)
        app_conn = AppConn(
            sock(doc["sock"]), app.pid, app.uid, doc["gid"], frozenset(doc["groups"]), 0.0, app=app
        )
        daemon._app_socks[app.app_id] = app_conn.sock
        daemon.control.adopt(app_conn)
        daemon.operator.app_registered(app)  # standing and persisted policies, before any call
        _restore_policies(daemon, app, doc["policies"])
    now = time.monotonic()
    for doc in state["unregistered"]:
        daemon.control.adopt(
            AppConn(
                sock(doc["sock"]),
                doc["pid"],
                doc["uid"],
                doc["gid"],
                frozenset(doc["groups"]),
                now + doc["left"],
            )
        )
    assert daemon.ingress is not None
    ingress_conns = daemon.ingress.import_state(  # type: ignore[attr-defined]
        state["ingress"], [sock(i) for i in state["ingress_socks"]]
    )
    import_served(daemon, state.get("calls"), ingress_conns)  # the calls server apps hold


def _restore_policies(daemon: Daemon, app: AppState, docs: list[dict[str, Any]]) -> None:
    """The policies the app had: those the standing rules attached again take their
    state; the others (``--transient`` ones, say) are attached as they were. Each
    runs the class it ran (an upgrade of this app) under the id it had."""
    assert app.datapath is not None and daemon.operator is not None
    manager = daemon.operator.policies
    fresh = list(app.datapath.policies)
    order: list[Any] = []  # the policies as they were in the chain
    for doc in docs:
        key = (doc["engine"], doc["side"], doc["method"], doc["config"])
        engine = next(
            (e for e in fresh if (e.NAME, e.ctx.side.value, e.ctx.method, dict(e.config)) == key),
            None,
        )
        try:
            cls = _policy_class(daemon, doc)
            if engine is not None:
                fresh.remove(engine)
                if cls is not None and type(engine) is not cls:  # upgraded for this app
                    daemon.operator.upgrades._swap(app, app.datapath, engine, cls)
                    engine = manager.engines[engine.ctx.engine_id][1]
            else:
                prepared, config, side, method = manager._prepare(
                    {k: doc[k] for k in ("engine", "side", "method", "config")}
                )
                engine_id = manager._attach_to(app, cls or prepared, config, side, method)
                engine = manager.engines[engine_id][1]
        except Exception as e:  # noqa: BLE001 - one policy lost is logged, not fatal
            log.warning(
                "hot restart: policy %s of app %r not attached again: %s",
                doc["engine"],
                app.name,
                e,
            )
            continue
        if doc.get("engine_id"):
            _rename(manager, engine, doc["engine_id"])
        order.append(engine)
        state = doc["state"]
        if state is None:
            continue
        try:
            if engine.check_compatible(doc["version"], state) is None:
                engine.load_state(state, doc["version"])
        except Exception as e:  # noqa: BLE001 - the policy works on with a fresh state
            log.warning(
                "hot restart: policy %s of app %r starts with a fresh state: %s",
                doc["engine"],
                app.name,
                e,
            )
    _reorder(app, order)


def _reorder(app: AppState, order: list[Any]) -> None:
    """Put the policies in the chain in ``order`` (the standing rules attached theirs
    first): each engine keeps its input deques, its outputs are pointed at the next
    engine's inputs (as ``Datapath.insert`` does); only while none holds an item."""
    dp, runtime = app.datapath, app.runtime
    assert dp is not None and runtime is not None
    now = dp.policies
    wanted = order + [e for e in now if e not in order]  # new standing ones: last
    if wanted == now:
        return
    if any(e.tx_in or e.tx_out or e.rx_in or e.rx_out for e in dp.engines[:-1]):
        log.warning("hot restart: the policies of app %r keep a new order", app.name)
        return
    chain = [dp.frontend, *wanted, dp.transport]
    for a, b in itertools.pairwise(chain):
        a.tx_out = b.tx_in
        b.rx_out = a.rx_in
    dp.engines[:] = chain
    slots = sorted(runtime.engines.index(e) for e in wanted)
    for slot, engine in zip(slots, wanted, strict=True):
        runtime.engines[slot] = engine


def _policy_class(daemon: Daemon, doc: dict[str, Any]) -> Any:
    """The class the policy ran, when it is not the registry's (None: the registry's)."""
    source = doc.get("module")
    if not source:
        return None
    return hotrestart_operator.engine_class(daemon, doc["engine"], source)


def _rename(manager: Any, engine: Any, engine_id: str) -> None:
    """Give a re-attached policy the id it had (the new id was never shown)."""
    was = engine.ctx.engine_id
    if was == engine_id:
        return
    with manager._lock:
        manager.engines[engine_id] = manager.engines.pop(was)
        if was in manager._recorded:
            manager._recorded[engine_id] = manager._recorded.pop(was)
        for rule in manager.standing.values():
            rule.engine_ids[:] = [engine_id if e == was else e for e in rule.engine_ids]
    engine.ctx.engine_id = engine_id


def _make_datapath(daemon: Daemon, app: AppState, classes: dict[str, Any]) -> Any:
    """``Daemon._make_datapath`` with the frontend and transport the app ran (an
    upgrade for this app, a transport switch), under the ids they had."""
    default = {"frontend": daemon.frontend_cls, "transport": daemon.transport_cls}
    chosen = dict(default)
    for role, (_eid, source) in classes.items():
        if engine_source(default[role]) != source:
            try:
                chosen[role] = hotrestart_operator.engine_class(daemon, default[role].NAME, source)
            except EngineLoadError as e:
                log.warning(
                    "hot restart: the %s of app %r is back to %s: %s",
                    role,
                    app.name,
                    engine_source(default[role]),
                    e,
                )
    daemon.frontend_cls, daemon.transport_cls = chosen["frontend"], chosen["transport"]
    try:
        attach = daemon._make_datapath(app)
    finally:
        daemon.frontend_cls, daemon.transport_cls = default["frontend"], default["transport"]
    dp = app.datapath
    assert dp is not None
    for role, engine in (("frontend", dp.frontend), ("transport", dp.transport)):
        if role in classes:
            engine.ctx.engine_id = classes[role][0]
    return attach


def _restore_app(daemon: Daemon, doc: dict[str, Any], fds: list[int], old_daemon: Any) -> AppState:
    old = old_daemon.apps[doc["app_id"]].regions  # the fork's mappings of its regions
    layout = ShmLayout(**old.layout.to_dict())
    regions = DaemonRegions(layout, -1, -1, -1, -1, -1, old.ctl, old.send, old.recv)
    app = AppState(
        doc["app_id"],
        doc["name"],
        doc["pid"],
        doc["uid"],
        regions,
        fds[doc["submit_efd"]],
        fds[doc["complete_efd"]],
    )
    app.registered_at = doc["registered_at"]
    app.counters.update(doc["counters"])
    app._tokens = itertools.count(int(doc["next_token"]))
    heap: Heap = app.recv_heap
    heap._alloc.import_state(doc["recv_heap"])
    for slot, texts in enumerate(doc["schema_texts"]):
        result = daemon.bindings.bind(texts)
        module = result.module
        app.bindings.append(Binding(slot, module, result.schema_hash, tuple(module.SERVICES)))
        app.schema_texts.append(texts)
    for conn_id, host, port, slot in doc["conns"]:
        app.conns[conn_id] = ConnSpec(conn_id, host, port, slot)
    attach = _make_datapath(daemon, app, doc.get("engine_classes") or {})
    dp = app.datapath
    assert dp is not None
    dp.frontend.import_state(doc["frontend"])  # type: ignore[attr-defined]
    dp.transport.import_state(  # type: ignore[attr-defined]
        doc["transport"], [socket.socket(fileno=fds[i]) for i in doc["transport_socks"]]
    )
    waiting = [rpc for rpc, _ in dp.transport.pending.values()]  # type: ignore[attr-defined]
    dp.frontend.adopt_calls(waiting)  # type: ignore[attr-defined]
    attach()  # the runtime is not running yet: on this thread
    with daemon.router.lock:
        for svc, slot in doc["served"]:
            app.served[svc] = app.bindings[slot]
            daemon.router.services[svc] = app
    with daemon.apps_lock:
        daemon.apps[app.app_id] = app
        daemon._claimants[app.app_id] = Claimant(
            app.uid, doc["gid"], frozenset(doc["groups"]), app.name, app.pid
        )
    return app
