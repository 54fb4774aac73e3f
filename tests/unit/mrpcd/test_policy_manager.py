"""PolicyManager: attach, detach, set and rules by name; every change all or
nothing; standing rules (``--all --future`` and ``policies:`` in the config) for
apps that come later; a bad config is refused before anything changes.

Real engines (engines.null, engines.ratelimit), real datapaths and runtimes (not
started: ``Runtime.call`` then runs inline, as it does from the runtime thread);
the daemon is a small stand-in with the attributes PolicyManager reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from libmrpc._shm import ShmLayout, create_regions
from libmrpc.status import ConfigError, RpcError, StatusCode
from mrpcd.appstate import AppState
from mrpcd.config import PolicyAttachment
from mrpcd.datapath import Datapath
from mrpcd.engine import EngineContext, FrontendEngine, MockClock, Services, Side, TransportEngine
from mrpcd.policy import PolicyManager
from mrpcd.registry import EngineRegistry
from mrpcd.runtime import Runtime


class Edge(FrontendEngine):
    """Stands in for the frontend at the app end of a datapath."""

    NAME = "test-edge"

    def do_work(self) -> int:
        return 0


class EdgeT(TransportEngine):
    """Stands in for the transport at the network end of a datapath."""

    NAME = "test-edge-transport"

    def do_work(self) -> int:
        return 0


@dataclass
class Cfg:
    policies: tuple[PolicyAttachment, ...] = ()
    persist_policies: bool = False  # the record has its own tests (test_persist.py)


@dataclass
class FakeDaemon:
    """The parts of mrpcd.daemon.Daemon that PolicyManager uses."""

    config: Cfg = field(default_factory=Cfg)
    registry: EngineRegistry = field(
        default_factory=lambda: EngineRegistry(
            {"null": "engines.null", "ratelimit": "engines.ratelimit", "tcp": "engines.tcp"}
        )
    )
    clock: MockClock = field(default_factory=MockClock)
    services: Services = field(default_factory=Services)
    ingress: Any = None
    apps: list[AppState] = field(default_factory=list)
    prefix: Path = Path("/nonexistent/mrpc-prefix")  # never written: persist_policies is off

    def find_apps(self, selector: str) -> list[AppState]:
        if selector in ("*", "--all"):
            return list(self.apps)
        return [a for a in self.apps if selector in (a.name, str(a.pid))]


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    d = FakeDaemon()
    yield d
    for app in d.apps:
        assert app.runtime is not None
        app.runtime.stop()
        app.close()


def add_app(d: FakeDaemon, name: str) -> AppState:
    regions, s_efd, c_efd = create_regions(name, ShmLayout(64, 1 << 16, 1 << 16))
    regions.close_fds()
    app = AppState(len(d.apps) + 1, name, 5000 + len(d.apps), os.getuid(), regions, s_efd, c_efd)
    ctx = EngineContext(f"{name}/edge", name, app.pid, d.clock)
    fe, tr = Edge(ctx, {}), EdgeT(ctx, {})
    app.datapath = Datapath(name, fe, tr)
    app.runtime = Runtime(f"rt-{name}", d.clock, spin_us=0)
    app.runtime.engines.extend([fe, tr])
    d.apps.append(app)
    return app


def policies(app: AppState) -> list[str]:
    assert app.datapath is not None
    return [e.ctx.engine_id for e in app.datapath.policies]


def runtime_names(app: AppState) -> list[str]:
    assert app.runtime is not None
    return [e.NAME for e in app.runtime.engines]


def code_of(fn: Callable[[], Any]) -> tuple[StatusCode, str]:
    with pytest.raises(RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_handler_maps_operator_ops() -> None:
    pm = PolicyManager(FakeDaemon())  # type: ignore[arg-type]  # a stand-in daemon
    assert pm.handler("policy_attach") == pm.attach and pm.handler("policy_rules") == pm.rules
    assert pm.handler("no_such_op") is None


def test_attach_by_app_name_splices_before_the_transport(daemon: FakeDaemon) -> None:
    kv, other = add_app(daemon, "kv"), add_app(daemon, "other")
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    out = pm.attach(
        {
            "engine": "ratelimit",
            "app": "kv",
            "side": "receive",
            "method": "Get",
            "config": {"max_tokens": 5},
        }
    )
    [eid] = out["engine_ids"]
    assert eid.startswith("kv/ratelimit-") and "rule_id" not in out
    assert policies(kv) == [eid] and policies(other) == []
    assert runtime_names(kv) == ["test-edge", "ratelimit", "test-edge-transport"]
    engine = pm.engines[eid][1]
    assert engine.ctx.side == Side.RECEIVE and engine.ctx.method == "Get"
    assert (
        engine.config["max_tokens"] == 5 and engine.config["mode"] == "reject"
    )  # validated, defaults filled


@pytest.mark.parametrize(
    ("msg", "code", "words"),
    [
        (
            {"engine": "ratelimit", "app": "kv", "config": {"max_tokens": 0}},
            StatusCode.INVALID_ARGUMENT,
            "bad config for ratelimit",
        ),
        (
            {"engine": "ratelimit", "app": "kv", "config": {}},
            StatusCode.INVALID_ARGUMENT,
            "max_tokens: required",
        ),
        (
            {"engine": "null", "app": "kv", "config": ["enforce"]},
            StatusCode.INVALID_ARGUMENT,
            "must be a mapping",
        ),
        (
            {"engine": "null", "app": "kv", "side": "sideways"},
            StatusCode.INVALID_ARGUMENT,
            "'sideways'",
        ),
        (
            {"engine": "null", "app": "kv", "method": 7},
            StatusCode.INVALID_ARGUMENT,
            "method must be a string",
        ),
        ({"engine": "no-such", "app": "kv"}, StatusCode.NOT_FOUND, "no-such"),
        ({"engine": "tcp", "app": "kv"}, StatusCode.INVALID_ARGUMENT, "always on"),
        ({"app": "kv"}, StatusCode.INVALID_ARGUMENT, "needs an engine name"),
        ({"engine": "null"}, StatusCode.INVALID_ARGUMENT, "--app NAME|PID or --all"),
        (
            {"engine": "null", "app": "nobody"},
            StatusCode.NOT_FOUND,
            "no application matches 'nobody'",
        ),
    ],
)
def test_a_bad_attach_changes_nothing(
    daemon: FakeDaemon, msg: dict[str, Any], code: StatusCode, words: str
) -> None:
    apps = [add_app(daemon, "kv"), add_app(daemon, "kv")]  # two apps of one name: both or neither
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    got, details = code_of(lambda: pm.attach(msg))
    assert got == code and words in details
    assert all(
        policies(a) == [] and runtime_names(a) == ["test-edge", "test-edge-transport"] for a in apps
    )
    assert pm.engines == {} and pm.standing == {}


def test_attach_to_every_app_of_a_name(daemon: FakeDaemon) -> None:
    a, b = add_app(daemon, "kv"), add_app(daemon, "kv")
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    ids = pm.attach({"engine": "null", "app": "kv"})["engine_ids"]
    assert len(ids) == 2 and policies(a) == ids[:1] and policies(b) == ids[1:]


def test_detach_by_id_and_by_name(daemon: FakeDaemon) -> None:
    kv = add_app(daemon, "kv")
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    [null_id] = pm.attach({"engine": "null", "app": "kv"})["engine_ids"]
    [rl_id] = pm.attach({"engine": "ratelimit", "app": "kv", "config": {"max_tokens": 1}})[
        "engine_ids"
    ]
    assert policies(kv) == [null_id, rl_id]
    out = pm.detach({"engine_id": null_id})
    assert out == {"detached": [{"engine_id": null_id, "handed_on": 0}]}
    assert policies(kv) == [rl_id] and runtime_names(kv) == [
        "test-edge",
        "ratelimit",
        "test-edge-transport",
    ]
    assert pm.detach({"app": "kv", "engine": "ratelimit"})["detached"][0]["engine_id"] == rl_id
    assert policies(kv) == [] and pm.engines == {}
    code, details = code_of(lambda: pm.detach({"engine_id": null_id}))
    assert code == StatusCode.NOT_FOUND and null_id in details
    code, _ = code_of(lambda: pm.detach({"app": "kv", "engine": "null"}))
    assert code == StatusCode.NOT_FOUND


def test_set_updates_every_target(daemon: FakeDaemon) -> None:
    add_app(daemon, "a"), add_app(daemon, "b")
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    ids = pm.attach({"engine": "ratelimit", "app": "*", "config": {"max_tokens": 5}})["engine_ids"]
    out = pm.set({"app": "*", "engine": "ratelimit", "config": {"max_tokens": 9}})
    assert out["updated"] == ids
    assert [pm.engines[i][1].config["max_tokens"] for i in ids] == [9, 9]


def test_set_is_all_or_nothing(daemon: FakeDaemon) -> None:
    add_app(daemon, "kv")
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    [rl_id] = pm.attach({"engine": "ratelimit", "app": "kv", "config": {"max_tokens": 5}})[
        "engine_ids"
    ]
    [null_id] = pm.attach({"engine": "null", "app": "kv"})["engine_ids"]
    # valid for the ratelimit engine (checked first), not for null: neither may change
    code, details = code_of(lambda: pm.set({"app": "kv", "config": {"max_tokens": 2}}))
    assert code == StatusCode.INVALID_ARGUMENT and f"bad config for {null_id}" in details
    assert pm.engines[rl_id][1].config["max_tokens"] == 5
    assert pm.engines[null_id][1].config == {"enforce": True}
    code, _ = code_of(lambda: pm.set({"app": "kv", "config": {}}))
    assert code == StatusCode.INVALID_ARGUMENT


def test_all_future_rule_applies_to_later_apps_until_removed(daemon: FakeDaemon) -> None:
    early = add_app(daemon, "early")
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    out = pm.attach(
        {"engine": "ratelimit", "app": "*", "future": True, "config": {"max_tokens": 3}}
    )
    rule_id = out["rule_id"]
    assert len(out["engine_ids"]) == 1 and len(policies(early)) == 1
    late = add_app(daemon, "late")
    pm.app_registered(late)
    [late_id] = policies(late)
    assert pm.engines[late_id][1].config["max_tokens"] == 3
    [rule] = pm.rules({})["rules"]
    assert (
        rule["rule_id"] == rule_id
        and rule["app"] == "*"
        and rule["engine_ids"] == [*out["engine_ids"], late_id]
    )
    pm.app_left(late)
    assert late_id not in pm.engines
    assert pm.detach({"rule_id": rule_id}) == {"detached": [], "rule_removed": rule_id}
    later = add_app(daemon, "later")
    pm.app_registered(later)
    assert policies(later) == [] and pm.rules({}) == {"rules": []}
    code, _ = code_of(lambda: pm.detach({"rule_id": rule_id}))
    assert code == StatusCode.NOT_FOUND


def test_future_rule_with_no_app_yet_and_a_name_selector(daemon: FakeDaemon) -> None:
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    out = pm.attach({"engine": "null", "app": "kv", "future": True})
    assert out["engine_ids"] == [] and out["rule_id"]
    other, kv = add_app(daemon, "other"), add_app(daemon, "kv")
    pm.app_registered(other)
    pm.app_registered(kv)
    assert policies(other) == [] and len(policies(kv)) == 1


def test_config_policies_become_standing_rules(daemon: FakeDaemon) -> None:
    daemon.config = Cfg((PolicyAttachment("ratelimit", "*", "receive", None, {"max_tokens": 4}),))
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    assert [r["rule_id"] for r in pm.rules({})["rules"]] == ["config-1"]
    app = add_app(daemon, "kv")
    pm.app_registered(app)
    [eid] = policies(app)
    engine = pm.engines[eid][1]
    assert engine.ctx.side == Side.RECEIVE and engine.config["max_tokens"] == 4


@pytest.mark.parametrize(
    ("attachment", "words"),
    [
        (
            PolicyAttachment("ratelimit", "*", "send", None, {"max_tokens": -1}),
            "policies[1]: bad config for ratelimit",
        ),
        (PolicyAttachment("no-such", "*", "send", None, {}), "policies[1]:"),
        (PolicyAttachment("tcp", "*", "send", None, {}), "always on"),
    ],
)
def test_a_bad_config_policy_is_refused_at_start(
    daemon: FakeDaemon, attachment: PolicyAttachment, words: str
) -> None:
    daemon.config = Cfg((PolicyAttachment("null", "*", "send", None, {}), attachment))
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        PolicyManager(daemon)  # type: ignore[arg-type]


def test_a_failing_standing_rule_does_not_stop_registration(
    daemon: FakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    pm = PolicyManager(daemon)  # type: ignore[arg-type]
    pm.attach({"engine": "null", "app": "*", "future": True})
    pm.attach({"engine": "ratelimit", "app": "*", "future": True, "config": {"max_tokens": 1}})
    daemon.registry = EngineRegistry({"ratelimit": "engines.ratelimit"})  # "null" went away
    app = add_app(daemon, "kv")
    pm.app_registered(app)
    assert [e.NAME for e in app.datapath.policies] == ["ratelimit"]  # type: ignore[union-attr]
    assert "standing rule rule-1 failed for app 'kv'" in caplog.text
