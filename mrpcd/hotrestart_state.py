"""Hot restart: what the old daemon hands over, and when it may.

:func:`settled` says the quiesced daemon holds nothing half done (calls that
only wait for an answer may stay when the new process restores them); then
:func:`collect_state` turns it into one plain-data document plus a list of fds
(the document names fds by their index in that list). Its inverse, in the new
process, is ``mrpcd/takeover.py``. Call both with every runtime parked and the
control loop paused. Neither changes the old daemon's state: after a failed
take-over it resumes as it was (rollback).

Document (``version`` is ``mrpcd.handover.VERSION``)::

    listeners (first, by collect_listeners): lock, listener, app_listener, op_listener,
        metrics_listener (or None)   fd indexes

    loaded (new -> old): calls_versions   the formats of calls in flight the new code
        restores (``mrpcd.hotrestart_calls.CALLS_VERSIONS``); absent in older code:
        then nothing in flight is carried and the old process waits for every call

    state:
    next_app_id, from_pid
    owners      [(service, uid, app_name, pid, app_id, since)]   service owners, oldest first
    apps        [app]          registered apps (below)
    unregistered [{sock, pid, uid, gid, groups, left}]           app sockets not registered yet
    ingress     {"conns": [conn doc], "counters": ...}, ingress_socks: [fd index]
    peer_connections   how many peer connections (for the report)
    calls       None (nothing carried) or {"version": CALLS_VERSION, "served":
                [(app_id, inbound call)]}: the calls server apps hold unanswered
                (``mrpcd/hotrestart_calls.py``); a version the new code does not
                know fails the take-over and the old process serves on
    operator    what operators changed (``mrpcd/hotrestart_operator.py``; added by the caller)

    app: app_id, name, pid, uid, gid, groups, registered_at, counters, sock, submit_efd,
         complete_efd (fd indexes; the new process keeps the mappings of the regions), schema_texts (per slot), conns
         [(conn_id, host, port, slot)], served [(service, slot)], next_token,
         recv_heap (BuddyAllocator.export_state), frontend (Frontend.export_state),
         transport (TcpTransport.export_state), transport_socks [fd index],
         policies [{engine_id, module, engine, version, side, method, config, state}],
         engine_classes {"frontend"|"transport": [engine_id, module]}

    transport: conns [(target, conn doc)], retired [(target, conn doc)] (retired
         connections while calls wait on them; their sockets follow the conns'),
         calls [outbound call], next_wire_id, counters

    outbound call (engines.handover_calls.outbound_doc): an app's call sent and
         waiting for its reply: wire_id, via (("conn", i): the i-th of conns +
         retired; ("local",): a server app of this daemon), call_id, conn
         (conn_id, host, port, slot), rec_off (its request in the app's send heap,
         which the app keeps until the completion), method_id, deadline (daemon
         clock = CLOCK_MONOTONIC), created, size, metadata, meta (a policy's
         scratch space if it is plain data, else {})

    inbound call (engines.handover_calls.inbound_doc): token, wire_id, origin
         (("tcp", i, reserved): the i-th ingress connection and the bytes the call
         reserves on it; ("local", client app_id); ("gone",): nobody waits),
         slot, heap_off, length (the request in the receive heap), method_id,
         deadline, created, size, metadata, peer, meta
"""

from __future__ import annotations

import os
import pickle
import time
from typing import TYPE_CHECKING, Any

from mrpcd.hotrestart_calls import export_served, waiting_only
from mrpcd.registry import engine_source

if TYPE_CHECKING:
    from mrpcd.appstate import AppState
    from mrpcd.daemon import Daemon


def settled(daemon: Daemon, waiting: bool = False) -> bool:
    """Nothing half done: nothing queued between engines, no frame half read or half
    written, no completion waiting for ring space; and no call in flight, unless
    ``waiting``: then calls that only wait for an answer (a peer's or a server app's)
    may stay, since the document carries them (``mrpcd/hotrestart_calls.py``)."""
    with daemon.apps_lock:
        apps = list(daemon.apps.values())
    for app in apps:
        if app.closed:
            return False  # its cleanup runs: wait for it
        dp = app.datapath
        if dp is None or app.inbox:
            return False
        if not waiting and (app.inflight or app.server_calls or app.bytes_inflight):
            return False
        for engine in dp.engines:
            if engine.tx_in or engine.tx_out or engine.rx_in or engine.rx_out:
                return False
        if not dp.frontend.settled(waiting) or not dp.transport.settled(waiting):  # type: ignore[attr-defined]
            return False
        if waiting and not waiting_only(app):
            return False
    ingress = daemon.ingress
    return ingress is None or ingress.settled(waiting)  # type: ignore[attr-defined]


class _Fds:
    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, fd: int) -> int:
        if fd < 0:
            raise ValueError("a closed descriptor cannot be handed over")
        self.fds.append(fd)
        return len(self.fds) - 1


def collect_listeners(daemon: Daemon) -> tuple[dict[str, Any], list[int]]:
    """What never changes while the daemon runs, sent first so that the new process
    builds its daemon before the old one pauses: the lock and the listening sockets."""
    fds = _Fds()
    metrics = getattr(daemon.operator, "_metrics_server", None)
    doc = {
        "lock": fds.add(daemon._lock_fd),
        "listener": fds.add(daemon.listener.fileno()),
        "app_listener": fds.add(daemon.app_listener.fileno()),
        "op_listener": fds.add(daemon.op_listener.fileno()),
        "metrics_listener": None if metrics is None else fds.add(metrics.socket.fileno()),
    }
    return doc, fds.fds


def collect_state(daemon: Daemon, waiting: bool = False) -> tuple[dict[str, Any], list[int]]:
    """The document and its fds; with ``waiting`` (the new process restores calls in
    flight) the calls that wait for an answer too. Reads only: a rollback resumes."""
    fds = _Fds()
    control = daemon.control
    by_app = {}
    unregistered = []
    now = time.monotonic()
    for conn in control.idle_connections():
        if conn.app is not None:
            by_app[conn.app.app_id] = conn
        else:
            unregistered.append(
                {
                    "sock": fds.add(conn.sock.fileno()),
                    "pid": conn.pid,
                    "uid": conn.uid,
                    "gid": conn.gid,
                    "groups": sorted(conn.groups),
                    "left": max(0.0, conn.deadline - now),
                }
            )
    with daemon.apps_lock:
        apps = sorted(daemon.apps.values(), key=lambda a: a.app_id)
        next_app_id = max([a.app_id for a in apps], default=0) + 1
    peers = 0
    app_docs = []
    for app in apps:
        app_conn = by_app.get(app.app_id)
        if (
            app_conn is None
        ):  # its control socket ended: the new daemon cleans it up by not knowing it
            continue
        doc = _app_doc(app, app_conn, fds)
        peers += len(doc["transport_socks"])
        app_docs.append(doc)
    ingress_doc: dict[str, Any] = {"conns": [], "counters": {}}
    ingress_socks: list[int] = []
    socks: list[Any] = []
    if daemon.ingress is not None:
        ingress_doc, socks = daemon.ingress.export_state()  # type: ignore[attr-defined]
        ingress_socks = [fds.add(s.fileno()) for s in socks]
    exported = {doc["app_id"] for doc in app_docs}
    calls = export_served(apps, socks, exported) if waiting else None
    with daemon.router.lock:
        owners = [
            (svc, o.uid, o.app_name, o.pid, o.app_id, o.since)
            for svc, o in daemon.router.owners.items()
        ]
    state = {
        "from_pid": os.getpid(),
        "next_app_id": next_app_id,
        "owners": owners,
        "apps": app_docs,
        "unregistered": unregistered,
        "ingress": ingress_doc,
        "ingress_socks": ingress_socks,
        "peer_connections": peers + len(ingress_socks),
        "calls": calls,
    }
    return state, fds.fds


def _app_doc(app: AppState, conn: Any, fds: _Fds) -> dict[str, Any]:
    dp = app.datapath
    assert dp is not None
    transport, socks = dp.transport.export_state()  # type: ignore[attr-defined]
    with app._heap_lock:
        heap = app.recv_heap._alloc.export_state()
    served = [(svc, b.slot) for svc, b in app.served.items()]
    return {
        "app_id": app.app_id,
        "name": app.name,
        "pid": app.pid,
        "uid": app.uid,
        "gid": conn.gid,
        "groups": sorted(conn.groups),
        "registered_at": app.registered_at,
        "counters": dict(app.counters),
        "sock": fds.add(conn.sock.fileno()),
        "submit_efd": fds.add(app.submit_efd),
        "complete_efd": fds.add(app.complete_efd),
        "schema_texts": list(app.schema_texts),
        "conns": [(c.conn_id, c.host, c.port, c.slot) for c in app.conns.values()],
        "served": served,
        "next_token": app.next_token(),
        "recv_heap": heap,
        "frontend": dp.frontend.export_state(),  # type: ignore[attr-defined]
        "transport": transport,
        "transport_socks": [fds.add(s.fileno()) for s in socks],
        "policies": [_policy_doc(e) for e in dp.policies],
        # the classes and ids of its always-on engines (a live upgrade or transport switch)
        "engine_classes": {
            role: [e.ctx.engine_id, engine_source(type(e))]
            for role, e in (("frontend", dp.frontend), ("transport", dp.transport))
        },
    }


def _policy_doc(engine: Any) -> dict[str, Any]:
    """An attached policy: what it is and its state (``decompose``, a snapshot for
    policies; None when it is not plain data: the new one then starts fresh)."""
    try:
        state = engine.decompose()
        pickle.dumps(state)
    except Exception:  # noqa: BLE001 - whatever it holds, the policy itself carries over
        state = None
    ctx = engine.ctx
    return {
        "engine_id": ctx.engine_id,  # what `mrpcctl list` shows and operators' scripts name
        "module": engine_source(type(engine)),  # a live upgrade of this app's engine
        "engine": engine.NAME,
        "version": engine.VERSION,
        "side": ctx.side.value,
        "method": ctx.method,
        "config": dict(engine.config),
        "state": state,
    }
