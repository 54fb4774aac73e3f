"""The ``local`` transport: calls to a server app of the same daemon skip TCP.

A :class:`~engines.tcp.TcpTransport` that hands a call whose target is this
daemon's own listening address straight to the server application
(:mod:`engines.local_calls`: one copy of the request into the server's receive
heap, one copy of the reply into the client's; no socket, no frames, no
ingress). Calls to any other daemon go over TCP as before, so ``local`` can be
any app's transport.

Its point is the live *transport switch*: ``mrpcctl engine upgrade tcp
--module engines.local --app APP`` replaces the app's running ``tcp`` engine by
this one. ``restore`` takes the tcp state whole: the calls already in flight on
TCP get their replies on their connection, which is retired (closed once its
last call is answered); new calls to this daemon go local. ``mrpcctl engine
upgrade local --module engines.tcp --app APP`` (or ``engine rollback local``)
switches back: the tcp engine completes the local calls still in flight
(``TcpTransport.post``) and sends new ones over TCP. No call fails either way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from engines import local_calls
from engines.local_calls import LocalOrigin
from engines.tcp import Target, TcpTransport
from mrpcd.engine import EngineContext, Rpc, TxCall

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def _listen_address(daemon_name: str) -> tuple[str, int] | None:
    """This daemon's listening (host, port), from its name ``HOSTNAME/HOST:PORT``."""
    addr = daemon_name.rsplit("/", 1)[-1]
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


class LocalTransport(TcpTransport):
    NAME = "local"
    VERSION = 1

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.router = ctx.services.router
        if self.router is None:
            raise ValueError("the local transport needs the daemon's router")
        self.listen = _listen_address(self.daemon_name)
        self.counters["local_calls"] = 0

    def is_local(self, key: Target) -> bool:
        """Does target (host, port, slot) name this daemon's listener? (Names other
        than localhost are not resolved: they go over TCP.)"""
        if self.listen is None:
            return False
        host, port = self.listen
        if key[1] != port:
            return False
        return key[0] == host or (
            _is_loopback(key[0]) and (_is_loopback(host) or _is_wildcard(host))
        )

    def _send_call(self, rpc: Rpc) -> None:
        st: TxCall = rpc._state
        if rpc._cancelled or not self.is_local(st.conn.key) or st.wire is None:
            return super()._send_call(rpc)
        if self.local is None or self.local.closed:
            self.local = LocalOrigin(self)
        local_calls.send(self, rpc, self.local)

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        super().load_state(state, prev_version)
        for key, conn in list(self.conns.items()):
            if self.is_local(key):  # its calls finish on it; new ones go local
                del self.conns[key]
                self.retired.add(conn)


ENGINE = LocalTransport
