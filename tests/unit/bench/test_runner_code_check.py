"""The runner fails a case whose client processes imported mrpc from the wrong tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import plan, runner
from bench.plan import Case
from bench.systems import StartContext, System

ELSEWHERE = "/elsewhere/libmrpc/__init__.py"


class WrongTreeDriver:
    """A client driver (run in a real bench.worker process) that reports another tree."""

    def __init__(self, server: dict[str, Any], case: dict[str, Any]) -> None:
        pass

    def open(self) -> dict[str, Any]:
        return {"code": {"libmrpc": ELSEWHERE}}

    def window(self, *args: Any) -> Any:
        raise AssertionError("a client from the wrong tree must not be measured")

    def close(self) -> None:
        pass


class WrongTreeSystem(System):
    name = "wrong-tree"
    summary = "a client that imported libmrpc from elsewhere"
    driver = "tests.unit.bench.test_runner_code_check:WrongTreeDriver"

    def start(self, ctx: StartContext) -> dict[str, Any]:
        return {}


def test_a_client_that_imported_another_tree_fails_the_case(tmp_path: Path) -> None:
    case = Case("latency", "scheduled", 1, 1, 64)
    rec = runner.run_case(WrongTreeSystem(), {}, case, plan.QUICK, tmp_path)
    print(rec.get("error"))
    assert rec["error"].startswith(f"client 0 imported libmrpc from {ELSEWHERE} instead of")
    assert rec["runs"] == [] and rec["summary"] == {"runs": 0}
