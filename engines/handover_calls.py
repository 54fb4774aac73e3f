"""Hot restart: calls waiting for an answer, as plain data and back.

A hot restart (``mrpcd/hotrestart.py``) hands the calls that only wait for an
answer to the new daemon process instead of letting them finish first: an
outbound call fully sent on a peer connection (or handed to a server app of
this daemon) that waits for its reply, and an inbound call delivered to a
server app that has not answered yet. These functions turn one such call into
a dict of plain values (what the hand-over document carries; the document's
layout is in ``mrpcd/hotrestart_state.py``) and, in the new process, back into
an :class:`~mrpcd.engine.Rpc` the new code's engines complete like any other.
They read the old objects and never change them: a failed take-over leaves
the old process with everything as it was.

The documents' layout has a version (``CALLS_VERSION`` in
``mrpcd/hotrestart_calls.py``): change it with them.
"""

from __future__ import annotations

import pickle
from typing import Any

from engines.local_calls import GoneOrigin, LocalOrigin
from engines.tcp_conn import Conn
from mrpcd.engine import AppPort, ConnSpec, Landed, MethodRef, Rpc, RpcKind, RxCall, TxCall


def _plain(meta: dict[str, Any]) -> dict[str, Any]:
    """A policy's scratch space, if it is plain data (else the new process starts it empty)."""
    try:
        pickle.dumps(meta)
    except Exception:  # noqa: BLE001 - whatever a policy left there
        return {}
    return dict(meta)


def _common(rpc: Rpc) -> dict[str, Any]:
    assert rpc.method is not None
    return {
        "method_id": rpc.method.id,
        "deadline": rpc.deadline,
        "created": rpc.created,
        "size": rpc.size,
        "metadata": tuple(rpc.metadata),
        "meta": _plain(rpc.meta),
    }


def _common_rpc(doc: dict[str, Any], app: AppPort, call_id: int, method: Any) -> Rpc:
    """The inverse of ``_common``: a CALL of ``app`` with the fields both kinds carry."""
    return Rpc(
        RpcKind.CALL,
        app.name,
        app.pid,
        call_id,
        MethodRef.of(method),
        deadline=doc["deadline"],
        size=int(doc["size"]),
        created=float(doc["created"]),
        meta=dict(doc["meta"]),
        metadata=tuple(doc["metadata"]),
    )


def outbound_doc(wire_id: int, rpc: Rpc, via: tuple[Any, ...]) -> dict[str, Any]:
    """An app's call waiting for its reply; ``via`` names the connection it waits on
    (``("conn", i)``: the transport's i-th exported connection; ``("local",)``)."""
    st: TxCall = rpc._state
    spec = st.conn
    return {
        "wire_id": wire_id,
        "via": via,
        "call_id": rpc.call_id,
        "conn": (spec.conn_id, spec.host, spec.port, spec.slot),
        "rec_off": st.rec_off,
        **_common(rpc),
    }


def outbound_rpc(doc: dict[str, Any], app: AppPort) -> Rpc:
    """The new process's copy of an ``outbound_doc`` call of ``app``."""
    conn_id, host, port, slot = doc["conn"]
    spec = app.conns.get(conn_id) or ConnSpec(conn_id, host, port, slot)
    binding = app.bindings[slot]
    rpc = _common_rpc(doc, app, int(doc["call_id"]), binding.module.METHODS[doc["method_id"]])
    rpc._state = TxCall(spec, binding, int(doc["rec_off"]))
    rpc._wire_id = int(doc["wire_id"])
    return rpc


def inbound_doc(srv: Rpc, origin: tuple[Any, ...]) -> dict[str, Any]:
    """A server app's call it has not answered; ``origin`` names where the answer
    goes (``("tcp", i)``: the ingress's i-th exported connection; ``("local",
    app_id)``: a client app of this daemon; ``("gone",)``: nobody waits any more)."""
    rx: RxCall = srv._state
    landed = rx.landed
    return {
        "token": srv.call_id,
        "wire_id": rx.wire_id,
        "origin": origin,
        "slot": rx.binding.slot,
        "heap_off": None if landed is None else landed.heap_off,
        "length": 0 if landed is None else landed.length,
        "peer": srv.peer,
        **_common(srv),
    }


def inbound_rpc(doc: dict[str, Any], app: AppPort, origin: Any) -> Rpc:
    """The new process's copy of an ``inbound_doc`` call served by ``app``."""
    binding = app.bindings[doc["slot"]]
    landed = None if doc["heap_off"] is None else Landed(int(doc["heap_off"]), int(doc["length"]))
    rpc = _common_rpc(doc, app, int(doc["token"]), binding.module.METHODS[doc["method_id"]])
    rpc.peer = str(doc["peer"])
    rpc._state = RxCall(origin, int(doc["wire_id"]), binding, landed, app)
    return rpc


def export_served(app: AppPort, ingress_socks: dict[int, int]) -> list[dict[str, Any]]:
    """The calls server app ``app`` holds unanswered (``ingress_socks``: id of an
    exported ingress connection's socket -> its index in the document)."""
    docs = []
    for srv in app.server_calls.values():
        rx: RxCall = srv._state
        origin = rx.origin
        where: tuple[Any, ...] = ("gone",)
        if isinstance(origin, LocalOrigin) and not origin.closed:
            where = ("local", getattr(origin.owner.app, "app_id", -1))
        elif isinstance(origin, Conn) and not origin.closed and id(origin.sock) in ingress_socks:
            entry = origin.rx_calls.get(rx.wire_id)
            if entry is not None:
                where = ("tcp", ingress_socks[id(origin.sock)], entry[1])
        docs.append(inbound_doc(srv, where))
    return docs


def import_served(app: AppPort, doc: dict[str, Any], origin: Any) -> Rpc:
    """Give server app ``app`` back an ``inbound_doc`` call; ``origin``: the ingress
    connection or the client transport's LocalOrigin it names, or None (gone)."""
    srv = inbound_rpc(doc, app, origin if origin is not None else GoneOrigin())
    app.server_calls[srv.call_id] = srv
    if isinstance(origin, Conn):
        origin.owner.adopt_call(origin, srv, int(doc["origin"][2]))  # the ingress
    elif isinstance(origin, LocalOrigin):
        origin.routed[int(doc["wire_id"])] = (srv, app)
    return srv
