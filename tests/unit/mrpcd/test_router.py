"""The daemon-wide Router: binding services to server apps (with ownership decided
by mrpcd.services), routing inbound calls by method id, HELLO checks, unbinding."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

import libmrpc
from libmrpc._codegen import load_module
from libmrpc._schema import compile_texts
from libmrpc._shm import ShmLayout, create_regions
from libmrpc.status import RpcError, StatusCode
from mrpcd.appstate import AppState, Router
from mrpcd.engine import Binding
from mrpcd.services import Claimant, ServicePolicy

ROOT = Path(__file__).resolve().parents[3]
echo = libmrpc.load_proto(ROOT / "schemas" / "echo.proto")
# another schema: two services, three methods (ids 0..2), one of them shares nothing with echo
TWO = load_module(
    compile_texts(
        {
            "two.proto": """syntax = "proto3";
package two;
message M { int64 x = 1; }
service A { rpc Get(M) returns (M); rpc Put(M) returns (M); }
service B { rpc Ping(M) returns (M); }
"""
        }
    )
)


@pytest.fixture
def make_app() -> Iterator[Callable[..., AppState]]:
    made: list[AppState] = []

    def make(name: str = "srv", uid: int = 1000, app_id: int | None = None) -> AppState:
        regions, s_efd, c_efd = create_regions(name, ShmLayout(64, 1 << 16, 1 << 16))
        regions.close_fds()
        app = AppState(app_id or len(made) + 1, name, 4000 + len(made), uid, regions, s_efd, c_efd)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


def binding(module: ModuleType, slot: int = 0) -> Binding:
    return Binding(slot, module, module.SCHEMA_HASH, tuple(module.SERVICES))


def test_bind_then_route_by_method_id(make_app: Callable[..., AppState]) -> None:
    router = Router("d1")
    app = make_app()
    b = binding(TWO)
    assert router.bind(app, b, ["two.A", "two.B"]) == []
    got_app, got_binding, method = router.route(TWO.SCHEMA_HASH, 2, frozenset({"two.A", "two.B"}))
    assert got_app is app and got_binding is b
    assert (method.service, method.name) == ("two.B", "Ping")
    assert router.route(TWO.SCHEMA_HASH, 0, ["two.A"])[2].name == "Get"
    assert app.served == {"two.A": b, "two.B": b}


@pytest.mark.parametrize(
    ("schema_hash", "method_id", "announced", "code", "words"),
    [
        (
            "0" * 16,
            0,
            ["two.A"],
            StatusCode.UNAVAILABLE,
            "no server application serves the called service at daemon d1",
        ),
        (TWO.SCHEMA_HASH, 3, ["two.A"], StatusCode.UNIMPLEMENTED, "method id 3 does not exist"),
        (TWO.SCHEMA_HASH, -1, ["two.A"], StatusCode.UNIMPLEMENTED, "method id -1"),
        (TWO.SCHEMA_HASH, 2, ["two.A"], StatusCode.FAILED_PRECONDITION, "two.B was not announced"),
    ],
)
def test_route_errors(
    make_app: Callable[..., AppState],
    schema_hash: str,
    method_id: int,
    announced: list[str],
    code: StatusCode,
    words: str,
) -> None:
    router = Router("d1")
    router.bind(make_app(), binding(TWO), ["two.A", "two.B"])
    with pytest.raises(RpcError) as e:
        router.route(schema_hash, method_id, announced)
    assert e.value.code() == code and words in e.value.details()


def test_route_after_unbind_and_of_a_closed_app_is_unavailable(
    make_app: Callable[..., AppState],
) -> None:
    router = Router("d1")
    a, b = make_app("a"), make_app("b")
    router.bind(a, binding(TWO), ["two.A"])
    router.bind(b, binding(TWO, slot=1), ["two.B"])
    router.unbind_app(a)
    with pytest.raises(RpcError) as e:
        router.route(TWO.SCHEMA_HASH, 0, ["two.A"])
    assert (
        e.value.code() == StatusCode.UNAVAILABLE
        and "serves two.A at daemon d1" in e.value.details()
    )
    assert router.route(TWO.SCHEMA_HASH, 2, ["two.B"])[0] is b  # other apps keep their routes
    assert router.owners["two.A"].uid == a.uid  # the name stays owned by the uid
    b.closed = True
    with pytest.raises(RpcError) as e:
        router.route(TWO.SCHEMA_HASH, 2, ["two.B"])
    assert e.value.code() == StatusCode.UNAVAILABLE


def test_route_does_not_walk_the_services_a_peer_announces(
    make_app: Callable[..., AppState],
) -> None:
    """O(1) in the peer's list: a lookup in a set of a million names costs one membership test."""

    class Counting(frozenset[str]):
        iterated = 0

        def __iter__(self) -> Iterator[str]:
            Counting.iterated += 1
            return super().__iter__()

    router = Router("d1")
    router.bind(make_app(), binding(TWO), ["two.A"])
    announced = Counting({f"s{i}" for i in range(100_000)} | {"two.A"})
    for _ in range(100):
        assert router.route(TWO.SCHEMA_HASH, 1, announced)[2].name == "Put"
    assert Counting.iterated == 0


def test_check_hello_refuses_a_different_schema_without_naming_ours(
    make_app: Callable[..., AppState],
) -> None:
    router = Router("d1")
    router.bind(make_app("secret-server"), binding(echo), ["echo.Echo"])
    router.check_hello(echo.SCHEMA_HASH, ["echo.Echo"], "peer")
    router.check_hello(
        "f" * 16, ["other.Service"], "peer"
    )  # services not served here: not our business
    with pytest.raises(RpcError) as e:
        router.check_hello("f" * 16, ["echo.Echo"], "peer")
    assert e.value.code() == StatusCode.FAILED_PRECONDITION
    assert "echo.Echo" in e.value.details()
    assert echo.SCHEMA_HASH not in e.value.details() and "secret-server" not in e.value.details()


def test_bind_is_all_or_none_and_a_running_holder_keeps_its_service(
    make_app: Callable[..., AppState],
) -> None:
    router = Router("d1")
    first, second = make_app("first"), make_app("second")
    router.bind(first, binding(TWO), ["two.B"])
    with pytest.raises(RpcError) as e:
        router.bind(second, binding(TWO), ["two.A", "two.B"])
    assert e.value.code() == StatusCode.ALREADY_EXISTS and "'first'" in e.value.details()
    assert (
        "two.A" not in router.services and second.served == {}
    )  # nothing of the failed bind stuck
    assert router.route(TWO.SCHEMA_HASH, 2, ["two.B"])[0] is first


def _authorize(
    policy: ServicePolicy, app: AppState
) -> Callable[[str, int | None, int | None], bool]:
    claimant = Claimant(app.uid, app.uid, frozenset(), app.name, app.pid)
    return lambda svc, owner, holder: policy.authorize(svc, claimant, owner, holder)


def test_ownership_first_uid_owns_the_name_after_its_app_left(
    make_app: Callable[..., AppState],
) -> None:
    router, policy = Router("d1"), ServicePolicy((), daemon_uid=os.geteuid() or 999)
    alice, mallory = make_app("alice", uid=1001), make_app("mallory", uid=1002)
    router.bind(alice, binding(TWO), ["two.A"], _authorize(policy, alice))
    router.unbind_app(alice)
    with pytest.raises(RpcError) as e:
        router.bind(mallory, binding(TWO), ["two.A"], _authorize(policy, mallory))
    assert (
        e.value.code() == StatusCode.PERMISSION_DENIED
        and "uid 1001 owns that name" in e.value.details()
    )
    assert "two.A" not in router.services
    alice2 = make_app("alice2", uid=1001)
    assert router.bind(alice2, binding(TWO), ["two.A"], _authorize(policy, alice2)) == []
    assert router.route(TWO.SCHEMA_HASH, 0, ["two.A"])[0] is alice2


def test_ownership_root_takes_over_a_running_app(make_app: Callable[..., AppState]) -> None:
    router, policy = Router("d1"), ServicePolicy((), daemon_uid=999)
    user, root = make_app("user", uid=1001), make_app("root", uid=0)
    router.bind(user, binding(TWO), ["two.A"], _authorize(policy, user))
    taken = router.bind(root, binding(TWO), ["two.A"], _authorize(policy, root))
    assert taken == [("two.A", user)]
    assert router.route(TWO.SCHEMA_HASH, 0, ["two.A"])[0] is root
    assert router.owners["two.A"].uid == 0


def test_idle_owner_records_per_uid_are_bounded(
    make_app: Callable[..., AppState], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Router, "MAX_IDLE_OWNERS_PER_UID", 3)
    router = Router("d1")
    for i in range(6):
        app = make_app(f"a{i}", uid=1001)
        router.bind(app, binding(TWO), [f"svc{i}"])
        router.unbind_app(app)
    router.bind(make_app("last", uid=1001), binding(TWO), ["svc-last"])
    idle = [s for s, o in router.owners.items() if o.uid == 1001 and s not in router.services]
    assert idle == ["svc3", "svc4", "svc5"]  # the oldest records went first
    assert "svc-last" in router.owners
