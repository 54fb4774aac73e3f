"""Hot restart: the calls that wait for an answer move to the new process.

The old process need not wait for slow calls to finish (``mrpcd/hotrestart.py``
quiesces until :func:`waiting_only`): a call that only waits for an answer is
handed over as plain data (``engines/handover_calls.py``). The client half (an
app's call sent and waiting for its reply) travels with the app's transport
(``TcpTransport.export_state``: ``calls``, and ``Frontend.adopt_calls`` counts it
in flight again); the server half (a call a server app holds unanswered, in
``AppState.server_calls``) is here, because its answer goes to a connection of
the ingress or to another app of this daemon: ``origin`` names which.

Only what waits is carried. Anything half done (a frame half read or half
written, calls queued between engines or held by a policy, completions waiting
for ring room, replies waiting for their memory to be reclaimed) keeps the
daemon unsettled and runs on until it is done, as before. mrpcd never imports
engines: the transport engines do the per-call work (``export_served``,
``import_served``, ``local_origin``), this module only says which goes where.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mrpcd.appstate import AppState
    from mrpcd.daemon import Daemon

#: The layout of the documents of calls in flight (``engines/handover_calls.py``);
#: bump it when they change.
CALLS_VERSION = 1
#: The versions this code restores (the new process says so in ``loaded``).
CALLS_VERSIONS = (CALLS_VERSION,)


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
    if pending is None or not hasattr(tr, "export_served"):
        return not outgoing and not app.inflight and not app.server_calls
    waiting = {rpc.call_id: (rpc, wire_id, via) for wire_id, (rpc, via) in pending.items()}
    if len(waiting) != len(outgoing) or set(outgoing) != app.inflight:
        return False  # a call on its way between the engines (or its reply)
    for call_id, rpc in outgoing.items():
        entry = waiting.get(call_id)
        if entry is None or entry[0] is not rpc:
            return False
        routed = getattr(entry[2], "routed", {}).get(entry[1])  # a local call
        if routed is not None and routed[1].server_calls.get(routed[0].call_id) is not routed[0]:
            return False  # the server app does not hold it yet
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
        if app.app_id in exported and app.server_calls and app.datapath is not None:
            tr: Any = app.datapath.transport
            served += [(app.app_id, doc) for doc in tr.export_served(index)]
    return {"version": CALLS_VERSION, "served": served}


def check_version(doc: dict[str, Any] | None) -> None:
    """Raise UnknownCallsFormat unless this code restores ``doc`` (None: none carried)."""
    if doc is None:
        return
    if doc.get("version") not in CALLS_VERSIONS:
        raise UnknownCallsFormat(
            f"the old mrpcd handed over calls in flight in format {doc.get('version')!r}; "
            f"this mrpcd restores {list(CALLS_VERSIONS)}"
        )


def import_served(daemon: Daemon, doc: dict[str, Any] | None, ingress_conns: list[Any]) -> int:
    """Give the restored server apps back the calls they hold (after the apps and
    the ingress are restored); returns how many."""
    if doc is None:
        return 0
    n = 0
    for app_id, call in doc["served"]:
        app = daemon.apps.get(app_id)
        if app is None or app.datapath is None:
            continue
        kind = call["origin"][0]
        origin: Any = None  # nobody waits for the answer any more
        if kind == "tcp":
            origin = ingress_conns[call["origin"][1]]
        elif kind == "local":
            client = daemon.apps.get(call["origin"][1])
            if client is not None and client.datapath is not None:
                origin = client.datapath.transport.local_origin()  # type: ignore[attr-defined]
        app.datapath.transport.import_served(call, origin)  # type: ignore[attr-defined]
        n += 1
    return n
