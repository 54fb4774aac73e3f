"""Wire features: what two daemons negotiate on a connection, and how a live
upgrade turns a feature on for connections that are already open.

How this works. The frame header's ``version`` byte stays 1 (the framing never
changed, and a daemon refuses a frame whose version it does not know). What a
daemon understands beyond the base protocol is a set of feature names it
advertises in its HELLO (client side) or HELLO_ACK (server side), under
``"features"``; a daemon that predates features sends none and is treated as
having none. Each side *uses* a feature on a connection only when both
advertised it (``Conn.features``, the intersection), and *accepts* a frame of a
feature only when it advertised that feature on that connection
(``Conn.accepts``; it never shrinks on a live connection, so a peer that has
not yet heard of a downgrade is not cut off).

A daemon before features closes a connection on an unknown frame type, so no
optional frame is ever sent to a peer that did not advertise it:

* ``features``: the peer understands a FEATURES frame. When a transport engine
  is upgraded in place its ``load_state`` calls :func:`sync` on every live
  connection: if what it understands differs from what was advertised there, a
  FEATURES frame announces the new set (``answer: false``); the peer records it,
  recomputes what is in use and answers with its own set (``answer: true``), so
  both directions switch on the same connection without reconnecting.
* ``batch``: the peer accepts BATCH frames (several small frames under one
  header, :mod:`engines.tcp_conn`); counted as ``batched_frames``.

Engines advertise :data:`WIRE_FEATURES` (a class attribute, ``WIRE_FEATURES``,
so an older engine version advertises less).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from libmrpc.wire.errors import WireError
from libmrpc.wire.frames import FEATURES, decode_json_body, encode_json_frame

log = logging.getLogger(__name__)

FEAT_FEATURES = "features"  # understands FEATURES frames (re-announcement on a live connection)
FEAT_BATCH = "batch"  # accepts BATCH frames
WIRE_FEATURES: frozenset[str] = frozenset({FEAT_FEATURES, FEAT_BATCH})
MAX_FEATURES = 32  # names one peer may announce
MAX_FEATURE_NAME = 32  # characters in one name
MAX_ANSWERS = 16  # FEATURES answered per connection; more is a peer's loop or flood


def parse(value: Any, where: str) -> frozenset[str]:
    """A peer's ``features`` field (absent: none). Raises WireError (the peer's
    fault: the connection closes) when it is not a short list of short strings;
    names this daemon does not know are kept and simply never match."""
    if value is None:
        return frozenset()
    if (
        not isinstance(value, list)
        or len(value) > MAX_FEATURES
        or not all(isinstance(f, str) and 0 < len(f) <= MAX_FEATURE_NAME for f in value)
    ):
        raise WireError(
            f"{where}: 'features' must be a list of at most {MAX_FEATURES} names of at most "
            f"{MAX_FEATURE_NAME} characters"
        )
    return frozenset(value)


def advertise(conn: Any, local: frozenset[str]) -> list[str]:
    """What this side tells the peer in its HELLO / HELLO_ACK; recorded on ``conn``."""
    conn.advertised = local
    conn.accepts = conn.accepts | local
    return sorted(local)


def negotiate(conn: Any, local: frozenset[str], peer: frozenset[str]) -> None:
    """The peer advertised ``peer``: use what both sides have."""
    conn.peer_features = peer
    conn.features = local & peer


def sync(conn: Any, local: frozenset[str]) -> bool:
    """After a live upgrade (or rollback): this side now understands ``local``.
    Announce it on ``conn`` if it changed and the peer understands FEATURES
    frames; returns True when a frame was queued (the caller flushes it)."""
    if not conn.open or conn.advertised is None:
        return False  # no handshake yet: the HELLO / HELLO_ACK will carry the new set
    conn.features = local & conn.peer_features
    if conn.advertised == local or FEAT_FEATURES not in conn.peer_features:
        return False
    frame = encode_json_frame(FEATURES, {"features": advertise(conn, local), "answer": False})
    conn.queue([frame], batchable=False)
    log.info(
        "announced wire features %s to %s (in use now: %s)",
        ",".join(sorted(local)) or "-",
        conn.peer,
        ",".join(sorted(conn.features)) or "-",
    )
    return True


def on_features(conn: Any, body: memoryview, local: frozenset[str]) -> bool:
    """A FEATURES frame from the peer: record its set, use what both have, and
    answer an announcement with ours. Raises WireError when this side never
    advertised ``features`` (a peer must not send it then), or on a malformed
    body or a flood. Returns True when an answer was queued."""
    if FEAT_FEATURES not in conn.accepts:
        raise WireError("FEATURES frame, which this daemon did not advertise")
    msg = decode_json_body(body)
    negotiate(conn, local, parse(msg.get("features"), "FEATURES"))
    log.info(
        "peer %s announced wire features %s (in use now: %s)",
        conn.peer,
        ",".join(sorted(conn.peer_features)) or "-",
        ",".join(sorted(conn.features)) or "-",
    )
    if msg.get("answer") is True:
        return False
    answers = conn.info.get("features_answered", 0) + 1
    if answers > MAX_ANSWERS:
        raise WireError(f"more than {MAX_ANSWERS} FEATURES announcements on one connection")
    conn.info["features_answered"] = answers
    frame = encode_json_frame(FEATURES, {"features": advertise(conn, local), "answer": True})
    conn.queue([frame], batchable=False)
    return True


def describe(conns: Iterable[Any]) -> dict[str, int]:
    """Counts for ``statistics()``: open connections, and those batching now."""
    live = [c for c in conns if c.open]
    return {"conns_batching": sum(1 for c in live if FEAT_BATCH in c.features)}
