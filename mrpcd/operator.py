"""Operator commands (the ``mrpcctl`` side of the daemon).

Every command answers: ``{"ok": true, ...}`` or an error with a gRPC status
number and a message saying what is wrong and what to do.
"""

from __future__ import annotations

import grp
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from libmrpc._control import error_reply
from libmrpc.status import MrpcError, RpcError, StatusCode
from mrpcd import VERSION, gcwatch

if TYPE_CHECKING:
    from mrpcd.appstate import AppState
    from mrpcd.daemon import Daemon

log = logging.getLogger(__name__)


class OperatorHandler:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.metrics_addr: str | None = None
        self._metrics_server: Any = None
        self.inherited_metrics: Any = None  # a hot restart: the old daemon's metrics listener
        from mrpcd.policy import PolicyManager

        self.policies = PolicyManager(daemon)
        from mrpcd.upgrade import UpgradeManager

        self.upgrades = UpgradeManager(daemon, self.policies)

    # ------------------------------------------------------------------ access

    def refuse(self, uid: int, gid: int, groups: frozenset[int]) -> dict[str, Any] | None:
        """An error reply for a peer that must not operate the daemon, else None.

        Decided by the credentials the kernel recorded when the peer connected
        (SO_PEERCRED, SO_PEERGROUPS): root, the daemon's own user, or a process
        holding ``operator_group`` as its primary or a supplementary group. Not by
        pid and not by the group database: what counts is what the process holds.
        """
        if uid in (0, os.geteuid()):
            return None
        group = self.daemon.config.operator_group
        hint = "root or the daemon's user"
        if group:
            hint += f", or a process in group {group!r} (operator_group)"
            try:
                ops_gid = grp.getgrnam(group).gr_gid
            except KeyError:
                log.warning(
                    "operator_group %r does not exist; only root and uid %d may operate",
                    group,
                    os.geteuid(),
                )
            else:
                if ops_gid == gid or ops_gid in groups:
                    return None
        return error_reply(
            StatusCode.PERMISSION_DENIED,
            f"uid {uid} (gid {gid}) is not allowed to operate mrpcd: operators are {hint}; "
            f"a user added to the group must log in again to hold it",
        )

    # ------------------------------------------------------------------ metrics endpoint

    def start_metrics(self) -> None:
        listen = self.daemon.config.metrics.listen
        registry = self.policies.metrics_registry()
        inherited, self.inherited_metrics = self.inherited_metrics, None
        if inherited is not None and (
            listen is None or listen[1] not in (0, inherited.getsockname()[1])
        ):
            inherited.close()  # the config moved or dropped the endpoint
            inherited = None
        if listen is None or registry is None:
            return
        from mrpcd.metrics_http import start_http_server

        self._metrics_server, port = start_http_server(
            registry, listen[0], listen[1], sock=inherited
        )
        self.metrics_addr = f"{listen[0]}:{port}"
        log.info("metrics on http://%s/metrics", self.metrics_addr)

    def stop(self) -> None:
        if self._metrics_server is not None:
            try:
                self._metrics_server.shutdown()
            except Exception as e:  # noqa: BLE001 - stopping goes on whatever the metrics server raises
                log.debug("metrics server shutdown failed: %s", e)

    def app_registered(self, app: AppState) -> None:
        self.policies.app_registered(app)

    def app_left(self, app: AppState) -> None:
        self.policies.app_left(app)

    # ------------------------------------------------------------------ commands

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        handler = (
            getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        )
        if handler is None:
            handler = self.policies.handler(op)
        if handler is None:
            return error_reply(StatusCode.UNIMPLEMENTED, f"unknown operator command {op!r}")
        try:
            result = handler(msg)
        except RpcError as e:
            return error_reply(e.code(), e.details())
        except MrpcError as e:
            return error_reply(StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.exception("operator command %r failed", op)
            return error_reply(StatusCode.INTERNAL, f"{op} failed inside mrpcd: {e}")
        return {"ok": True, **result}

    def op_daemon_restart(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Hot restart (``mrpcd/hotrestart.py``); once answered, this process exits."""
        timeout = msg.get("timeout")
        if timeout is not None and (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout <= 600
        ):
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"timeout must be a number of seconds in (0, 600], got {timeout!r}",
            )
        return self.daemon.hot_restart(None if timeout is None else float(timeout))

    def op_status(self, msg: dict[str, Any]) -> dict[str, Any]:
        d = self.daemon
        return {
            "pid": os.getpid(),
            "version": VERSION,
            "listen": d.listen_addr,
            "prefix": str(d.prefix),
            "uptime_s": round(time.time() - d.started, 3),
            "apps": len(d.apps),
            "draining": d.draining,
            "transport": d.config.transport,
            "runtimes": [
                {
                    "name": rt.name,
                    "engines": len(rt.engines),
                    "rounds": rt.rounds,
                    "sleeps": rt.sleeps,
                }
                for rt in d.runtimes
            ],
            "bind_cache": dict(d.bindings.stats, dir=str(d.bindings.cache_dir)),
            "gc": gcwatch.WATCH.stats(),
            "metrics": self.metrics_addr,
            "config": d.config.to_dict(),
        }

    def op_list(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"apps": self.daemon.describe_apps()}

    def op_services(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"services": self.daemon.describe_services()}

    def op_schema_prefetch(self, msg: dict[str, Any]) -> dict[str, Any]:
        result = self.daemon.bindings.bind(msg.get("texts"))  # checks the texts and their size
        return {
            "schema_hash": result.schema_hash,
            "how": result.how,
            "bind_ms": round(result.seconds * 1e3, 3),
            "services": list(result.module.SERVICES),
        }

    # ------------------------------------------------------------------ engines (mrpcd/upgrade.py)

    def op_engine_upgrade(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.upgrades.upgrade(msg)

    def op_engine_rollback(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.upgrades.rollback(msg)

    def op_engine_call(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.upgrades.call(msg)
