"""Service ownership decisions (mrpcd.services): config rules, first owner, takeover."""

from __future__ import annotations

import pytest

from libmrpc.status import ConfigError, RpcError, StatusCode
from mrpcd.config import ServiceRule
from mrpcd.services import Claimant, ServicePolicy

DAEMON = 500


def who(uid: int, gid: int = 100, groups: frozenset[int] = frozenset()) -> Claimant:
    return Claimant(uid, gid, groups, f"app{uid}", 1000 + uid)


def denied(policy: ServicePolicy, *args: object) -> str:
    with pytest.raises(RpcError) as info:
        policy.authorize(*args)  # type: ignore[arg-type]
    assert info.value.code() == StatusCode.PERMISSION_DENIED
    return info.value.details()


def test_without_rules_the_first_uid_owns_the_name() -> None:
    p = ServicePolicy((), daemon_uid=DAEMON)
    assert p.authorize("kv.Store", who(1001), None, None) is False  # first claim
    assert p.authorize("kv.Store", who(1001), 1001, None) is False  # the owner again
    msg = denied(p, "kv.Store", who(1002), 1001, None)
    assert "uid 1001 owns that name" in msg and "`services`" in msg and "kv.Store" in msg
    # root and the daemon's user may claim it, and take it from a running app of another uid
    assert p.authorize("kv.Store", who(0), 1001, 1001) is True
    assert p.authorize("kv.Store", who(DAEMON), 1001, 1001) is True
    assert p.authorize("kv.Store", who(DAEMON), DAEMON, DAEMON) is False  # same uid: ALREADY_EXISTS


def test_the_first_matching_rule_decides_alone() -> None:
    rules = (
        ServiceRule("kv.Store", (1001,), ()),
        ServiceRule("kv.*", (), (77,)),
        ServiceRule("*", (0,), ()),
    )
    p = ServicePolicy(rules, daemon_uid=DAEMON)
    assert p.authorize("kv.Store", who(1001), None, None) is False
    assert "services[0]" in denied(
        p, "kv.Store", who(0), None, None
    )  # root is not implied by a rule
    assert p.authorize("kv.Cache", who(1003, groups=frozenset({77})), None, None) is False
    assert p.authorize("kv.Cache", who(1003, gid=77), None, None) is False
    assert "services[1]" in denied(p, "kv.Cache", who(1003), None, None)
    assert "services[2]" in denied(p, "other.Svc", who(1001), None, None)
    assert p.authorize("other.Svc", who(0), 1001, 1001) is False  # rules do not take over


def test_unknown_user_or_group_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"services\[0\].uids: no user named 'no-such-user-x'"):
        ServicePolicy((ServiceRule("a.B", ("no-such-user-x",), ()),))
    assert ServicePolicy((ServiceRule("a.B", ("root",), ("root",)),)).rules[0].uids == frozenset(
        {0}
    )
