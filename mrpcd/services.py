"""Who may serve a service name at this daemon.

How this works: the first rule of the config key ``services`` whose name
matches a service decides alone (its uids and groups). With no matching rule,
the first uid that serves a name owns it for the daemon's lifetime, also after
its app exits; later only that uid, root or the daemon's own user may serve
it, and root or the daemon's user take it over from another uid's running app
(the issue this prevents: an unprivileged user's app claiming
``pkg.Service`` first and receiving everyone's calls).

The owner records live in :class:`mrpcd.appstate.Router` (under its lock);
this module only decides.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass

from libmrpc.status import ConfigError, RpcError, StatusCode
from mrpcd.config import ServiceRule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimant:
    """The credentials of a server app, as the kernel recorded them at connect."""

    uid: int
    gid: int
    groups: frozenset[int]
    app_name: str
    pid: int


@dataclass(frozen=True)
class _Rule:
    index: int
    name: str
    uids: frozenset[int]
    gids: frozenset[int]

    def matches(self, service: str) -> bool:
        if self.name == "*":
            return True
        if self.name.endswith(".*"):
            return service.startswith(self.name[:-1])
        return service == self.name

    def allows(self, c: Claimant) -> bool:
        return c.uid in self.uids or c.gid in self.gids or bool(c.groups & self.gids)


def _resolve(values: tuple[int | str, ...], lookup: str, key: str) -> frozenset[int]:
    out = set()
    for v in values:
        if isinstance(v, int):
            out.add(v)
            continue
        try:
            out.add(pwd.getpwnam(v).pw_uid if lookup == "user" else grp.getgrnam(v).gr_gid)
        except KeyError:
            raise ConfigError(
                f"{key}: no {lookup} named {v!r} on this host; fix the mrpcd config"
            ) from None
    return frozenset(out)


class ServicePolicy:
    """Decides whether a claimant may serve a service (and may take it over)."""

    def __init__(self, rules: tuple[ServiceRule, ...], daemon_uid: int | None = None) -> None:
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        self.rules = [
            _Rule(
                i,
                r.name,
                _resolve(r.uids, "user", f"services[{i}].uids"),
                _resolve(r.groups, "group", f"services[{i}].groups"),
            )
            for i, r in enumerate(rules)
        ]

    def rule_for(self, service: str) -> _Rule | None:
        return next((r for r in self.rules if r.matches(service)), None)

    def privileged(self, uid: int) -> bool:
        return uid in (0, self.daemon_uid)

    def authorize(
        self, service: str, c: Claimant, owner_uid: int | None, holder_uid: int | None
    ) -> bool:
        """Raise PERMISSION_DENIED if ``c`` may not serve ``service``.

        ``owner_uid`` owns the name (None: nobody yet); ``holder_uid`` is the uid of
        the app serving it now (None: nobody). True if ``c`` may take the service
        over from that app, False if a running holder makes it ALREADY_EXISTS.
        """
        rule = self.rule_for(service)
        if rule is not None:
            if not rule.allows(c):
                raise RpcError(
                    StatusCode.PERMISSION_DENIED,
                    f"app {c.app_name!r} (pid {c.pid}, uid {c.uid}) may not serve {service}: "
                    f"rule services[{rule.index}] (name {rule.name!r}) allows uids "
                    f"{sorted(rule.uids) or '-'} and gids {sorted(rule.gids) or '-'}; "
                    f"change `services` in the mrpcd config to allow it",
                )
            return False  # everyone the rule allows is trusted alike: a running holder keeps it
        if owner_uid is not None and owner_uid != c.uid and not self.privileged(c.uid):
            raise RpcError(
                StatusCode.PERMISSION_DENIED,
                f"app {c.app_name!r} (pid {c.pid}, uid {c.uid}) may not serve {service}: "
                f"uid {owner_uid} owns that name at this daemon (it served it first); only "
                f"uid {owner_uid}, root or the daemon's user (uid {self.daemon_uid}) may "
                f"serve it; to allow others add a rule to `services` in the mrpcd config "
                f"(e.g. {{name: {service}, uids: [{c.uid}]}})",
            )
        return holder_uid is not None and holder_uid != c.uid and self.privileged(c.uid)
