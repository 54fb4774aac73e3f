"""UpgradeManager on a fake daemon: the swap, its rollbacks, fresh module loads."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from libmrpc.status import RpcError, StatusCode
from mrpcd.datapath import Datapath
from mrpcd.engine import Engine, EngineContext, EngineState, MockClock, PolicyEngine, Rpc, Verdict
from mrpcd.registry import EngineLoadError, engine_source, load_fresh_engine_class
from mrpcd.upgrade import UpgradeManager
from tests.unit.mrpcd.test_datapath import Frontend, Transport, check_chain, ids, submit

APP = "kv"


def ctx(name: str) -> EngineContext:
    return EngineContext(engine_id=f"{APP}/{name}", app=APP, app_pid=1, clock=MockClock())


class Holder(PolicyEngine):
    """Holds every CALL; ``decompose`` gives the held calls away (like the tcp
    transport's, it empties the engine), ``load_state`` takes them."""

    NAME = "holder"

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.held: list[Rpc] = []
        self.closed = False

    def on_call(self, rpc: Rpc) -> Verdict:
        self.held.append(rpc)
        return Verdict.HOLD

    def decompose(self) -> dict[str, Any]:
        state = {"held": self.held, **super().decompose()}
        self.held = []
        return state

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        super().load_state(state, prev_version)
        self.held = list(state.get("held", []))

    def flush(self) -> int:
        for rpc in self.held:
            self.release(rpc)
        n, self.held = len(self.held), []
        return n

    def close(self) -> None:
        self.closed = True


class HolderV2(Holder):
    VERSION = 2


class RaisesV2(Holder):
    VERSION = 2

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        self.held = list(state["held"])  # adopts part of the state, then fails
        raise RuntimeError("cannot read it")


class PickyV2(Holder):
    VERSION = 2

    @classmethod
    def check_compatible(cls, prev_version: int, state: Mapping[str, Any]) -> str | None:
        return f"only from v7, not v{prev_version}"


class FakeRuntime:
    def __init__(self) -> None:
        self.engines: list[Engine] = []

    def call(self, fn: Callable[[], Any]) -> Any:
        return fn()


class FakeApp:
    def __init__(self) -> None:
        self.name, self.pid, self.closed = APP, 1, False
        self.runtime = FakeRuntime()
        self.datapath = Datapath(APP, Frontend(ctx("frontend"), {}), Transport(ctx("tcp"), {}))
        self.runtime.engines.extend(self.datapath.engines)


class FakePolicies:
    def __init__(self) -> None:
        self.engines: dict[str, tuple[Any, Engine]] = {}

    def replaced(self, engine_id: str, app: Any, engine: Engine) -> None:
        self.engines[engine_id] = (app, engine)


class FakeDaemon:
    def __init__(self) -> None:
        self.app = FakeApp()

    def find_apps(self, selector: str) -> list[FakeApp]:
        return [self.app] if selector in ("*", APP) else []


def setup() -> tuple[UpgradeManager, FakeApp, Holder, FakePolicies]:
    daemon, policies = FakeDaemon(), FakePolicies()
    app = daemon.app
    old = Holder(ctx("holder-1"), {})
    app.datapath.insert(old)
    app.runtime.engines.insert(-1, old)
    policies.engines[old.ctx.engine_id] = (app, old)
    submit(app.datapath.frontend, range(4))
    old.do_work()
    assert [r.call_id for r in old.held] == [0, 1, 2, 3]
    submit(app.datapath.frontend, range(4, 6))  # still queued in old.tx_in
    return UpgradeManager(daemon, policies), app, old, policies  # type: ignore[arg-type]


def test_upgrade_swaps_in_place_keeps_state_and_rollback_returns() -> None:
    mgr, app, old, policies = setup()
    rt_list = app.runtime.engines
    (out,) = mgr._run("holder", "*", lambda _e: HolderV2)
    assert out.ok and (out.from_version, out.to_version) == (1, 2)
    new = app.datapath.policies[0]
    assert type(new) is HolderV2 and new.ctx.engine_id == old.ctx.engine_id
    assert [r.call_id for r in new.held] == [0, 1, 2, 3] and ids(new.tx_in) == [4, 5]
    assert app.runtime.engines is rt_list and new in rt_list and old not in rt_list
    assert policies.engines[old.ctx.engine_id][1] is new
    assert old.state is EngineState.DETACHED and old.closed
    assert new.state is EngineState.ATTACHED and new.counters["calls"] == 4
    check_chain(app.datapath)
    (back,) = mgr._run("holder", "*", lambda e: mgr.previous.get(e.ctx.engine_id))
    assert back.ok and (back.from_version, back.to_version) == (2, 1)
    assert type(app.datapath.policies[0]) is Holder
    assert [r.call_id for r in app.datapath.policies[0].held] == [0, 1, 2, 3]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("cls", "reason"),
    [(RaisesV2, "v2 failed to restore: RuntimeError: cannot read it"), (PickyV2, "only from v7")],
)
def test_refused_successor_rolls_back_with_state_intact(cls: type[Engine], reason: str) -> None:
    mgr, app, old, policies = setup()
    before = list(app.runtime.engines)
    (out,) = mgr._run("holder", "*", lambda _e: cls)
    assert not out.ok and reason in out.reason
    assert app.datapath.policies == [old] and app.runtime.engines == before
    assert old.state is EngineState.ATTACHED and not old.closed
    assert [r.call_id for r in old.held] == [0, 1, 2, 3] and ids(old.tx_in) == [4, 5]
    assert policies.engines[old.ctx.engine_id][1] is old
    assert old.ctx.engine_id not in mgr.previous
    with pytest.raises(RpcError) as e:
        mgr._answer("upgrade", "holder", [out], cls, "x")
    assert e.value.code() is StatusCode.FAILED_PRECONDITION and reason in e.value.details()
    old.flush()  # the old instance still works: everything it held goes on, once
    assert ids(app.datapath.transport.tx_in) == [0, 1, 2, 3]


def test_a_policy_cannot_take_the_transports_place() -> None:
    mgr, app, _old, _ = setup()
    (out,) = mgr._run("test-transport", "*", lambda _e: HolderV2)
    assert not out.ok and "cannot take the place" in out.reason
    assert type(app.datapath.transport) is Transport


def test_a_new_frontend_learns_that_a_policy_reads_content() -> None:
    mgr, app, _old, _ = setup()

    class Reader(PolicyEngine):
        NAME = "reader"
        READS_CONTENT = True

    app.datapath.insert(Reader(ctx("reader-1"), {}))
    assert app.datapath.frontend.private_images

    class FrontendV2(Frontend):
        VERSION = 2

    (out,) = mgr._run("test-frontend", "*", lambda _e: FrontendV2)
    assert out.ok and type(app.datapath.frontend) is FrontendV2
    assert app.datapath.frontend.private_images


def test_fresh_loads_are_new_module_objects(tmp_path: Path) -> None:
    a, source = load_fresh_engine_class(module="engines.null")
    b, _ = load_fresh_engine_class(module="engines.null")
    assert a is not b and a.__module__ != b.__module__ and source == "engines.null"
    assert engine_source(a) == "engines.null" and a.__module__ in sys.modules
    import engines.null  # the cached module is another object, untouched

    assert engines.null.ENGINE is not a and engines.null.ENGINE is not b
    path = tmp_path / "mine.py"
    path.write_text(
        "from engines.null import NullPolicy\n\nclass V2(NullPolicy):\n    VERSION = 2\n\nENGINE = V2\n"
    )
    path.chmod(0o644)
    cls, source = load_fresh_engine_class(file=str(path))
    assert cls.VERSION == 2 and source == str(path) and engine_source(cls) == str(path)
    path.chmod(0o664)
    with pytest.raises(EngineLoadError, match="chmod go-w"):
        load_fresh_engine_class(file=str(path))
    with pytest.raises(EngineLoadError, match="absolute path"):
        load_fresh_engine_class(file="mine.py")
    with pytest.raises(EngineLoadError, match="no such Python source module"):
        load_fresh_engine_class(module="engines.no_such_engine")
    path.write_text("raise SystemExit(3)\n")
    path.chmod(0o644)
    with pytest.raises(EngineLoadError, match="cannot import: SystemExit"):
        load_fresh_engine_class(file=str(path))
