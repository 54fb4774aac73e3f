"""Hot restart: the calls that wait for an answer move to the new process.

The old process need not wait for slow calls to finish (``mrpcd/hotrestart.py``
quiesces until :func:`waiting_only`): a call that only waits for an answer is
handed over as plain data (:mod:`engines.handover_calls`). The client half (an
app's call sent and waiting for its reply) travels with the app's transport
(``TcpTransport.export_state``: ``calls``, and ``Frontend.adopt_calls`` counts it
in flight again); the server half (a call a server app holds unanswered, in
``AppState.server_calls``) is here, because its answer goes to a connection of
the ingress or to another app of this daemon: ``origin`` names which.

Only what waits is carried. Anything half done (a frame half read or half
written, calls queued between engines or held by a policy, completions waiting
for ring room, replies waiting for their memory to be reclaimed) keeps the
daemon unsettled and runs on until it is done, as before.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from engines import handover_calls
from engines.handover_calls import CALLS_VERSIONS
from engines.local_calls import GoneOrigin, LocalOrigin
from engines.tcp_conn import Conn

if TYPE_CHECKING:
    from mrpcd.appstate import AppState
    from mrpcd.daemon import Daemon


class UnknownCallsFormat(Exception):
    """The old process handed over calls in a format this code does not know."""


def waiting_only(app: AppState) -> bool:
    """Every call of ``app`` in flight waits for an answer in a state the hand-over
    carries: its own calls at the transport, its inbound calls at the app."""
    dp = app.datapath
    assert dp is not None
    fe, tr = dp.frontend, dp.transport
    if app.reply_bytes:  # replies whose memory is not reclaimed yet: a moment
        return False
    pending = getattr(tr, "pending", None)
    outgoing: dict[int, Any] = getattr(fe, "outgoing", {})
    if pending is None:
        return not outgoing and not app.inflight
    waiting = {rpc.call_id: (rpc, wire_id, via) for wire_id, (rpc, via) in pending.items()}
    if len(waiting) != len(outgoing) or set(outgoing) != app.inflight:
        return False  # a call on its way between the engines (or its reply)
    for call_id, rpc in outgoing.items():
        entry = waiting.get(call_id)
        if entry is None or entry[0] is not rpc:
            return False
        via = entry[2]
        if isinstance(via, LocalOrigin):  # the server app of this daemon must hold it
            routed = via.routed.get(entry[1])
            if (
                routed is not None
                and routed[1].server_calls.get(routed[0].call_id) is not routed[0]
            ):
                return False
    return True


def export_served(
    apps: list[AppState], ingress_socks: list[socket.socket], exported: set[int]
) -> dict[str, Any]:
    """The calls the server apps hold unanswered, as plain data (reads only).
    ``ingress_socks``: the ingress's exported connections' sockets, in order;
    ``exported``: ids of the apps the document carries."""
    index = {id(s): i for i, s in enumerate(ingress_socks)}
    served = []
    for app in apps:
        if app.app_id not in exported:
            continue
        for srv in app.server_calls.values():
            served.append((app.app_id, handover_calls.inbound_doc(srv, _origin(srv, index))))
    return {"version": handover_calls.CALLS_VERSION, "served": served}


def _origin(srv: Any, index: dict[int, int]) -> tuple[Any, ...]:
    rx = srv._state
    origin = rx.origin
    if isinstance(origin, LocalOrigin) and not origin.closed:
        return ("local", origin.owner.app.app_id)
    if isinstance(origin, Conn) and not origin.closed and id(origin.sock) in index:
        entry = origin.rx_calls.get(rx.wire_id)
        if entry is not None:
            return ("tcp", index[id(origin.sock)], entry[1])
    return ("gone",)


def check_version(doc: dict[str, Any] | None) -> None:
    """Raise UnknownCallsFormat unless this code restores ``doc`` (None: none carried)."""
    if doc is None:
        return
    if doc.get("version") not in CALLS_VERSIONS:
        raise UnknownCallsFormat(
            f"the old mrpcd handed over calls in flight in format {doc.get('version')!r}; "
            f"this mrpcd restores {list(CALLS_VERSIONS)}"
        )


def import_served(daemon: Daemon, doc: dict[str, Any] | None, ingress_conns: list[Conn]) -> int:
    """Give the restored server apps back the calls they hold (after the apps and
    the ingress are restored); returns how many."""
    if doc is None:
        return 0
    ingress = daemon.ingress
    n = 0
    for app_id, call in doc["served"]:
        app = daemon.apps.get(app_id)
        if app is None:
            continue
        kind = call["origin"][0]
        origin: Any = GoneOrigin()
        client = daemon.apps.get(call["origin"][1]) if kind == "local" else None
        if kind == "tcp":
            origin = ingress_conns[call["origin"][1]]
        elif client is not None and client.datapath is not None:
            tr: Any = client.datapath.transport
            if getattr(tr, "local", None) is None:
                tr.local = LocalOrigin(tr)
            origin = tr.local
        srv = handover_calls.inbound_rpc(call, app, origin)
        app.server_calls[srv.call_id] = srv
        if kind == "tcp" and ingress is not None:
            ingress.adopt_call(origin, srv, int(call["origin"][2]))  # type: ignore[attr-defined]
        elif isinstance(origin, LocalOrigin):
            origin.routed[srv._state.wire_id] = (srv, app)
        n += 1
    return n
