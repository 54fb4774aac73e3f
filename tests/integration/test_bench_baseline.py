"""Smoke test of ``python -m bench run --baseline REV``: real daemons of both trees,
tiny windows (bench/baseline.py, bench/paired.py, bench/compare.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from bench import compare, plan, report, runner
from bench.systems.mrpc_systems import Mrpc

TINY = dataclasses.replace(plan.QUICK, runs=8, lat_duration=0.05, warmup=0.02)


def test_baseline_head_runs_both_trees_alternating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Mrpc, "has_bind_time", False)  # bind time is not what this tests
    t0 = time.monotonic()
    results = runner.run(TINY, ["mrpc"], tmp_path, lambda msg: None, ("latency",), "HEAD")
    print(f"run took {time.monotonic() - t0:.1f}s")
    bl = results["baseline"]
    assert bl["pairs"] == [["mrpc", "mrpc@HEAD"]]
    root = Path(bl["root"])
    assert not root.parent.exists(), "the checkout must be removed after the run"
    mine, base = results["systems"]["mrpc"], results["systems"]["mrpc@HEAD"]
    assert (mine["status"], base["status"]) == ("ok", "ok"), (mine, base)

    # every process of the twin ran the checkout's code, the working tree's its own
    assert all(Path(p).is_relative_to(root) for p in bl["imports"]["HEAD"].values())
    assert not any(Path(p).is_relative_to(root) for p in bl["imports"]["working tree"].values())
    for case in base["cases"]:
        assert Path(case["client_info"]["code"]["libmrpc"]).is_relative_to(root)
    for case in mine["cases"]:
        assert not Path(case["client_info"]["code"]["libmrpc"]).is_relative_to(root)
    assert not set(mine["server_info"]["cache_dirs"]) & set(base["server_info"]["cache_dirs"])

    # windows alternate A B A B ...
    for a_case, b_case in zip(mine["cases"], base["cases"], strict=True):
        starts: list[tuple[float, str]] = sorted(
            [(r["started"], "A") for r in a_case["runs"]]
            + [(r["started"], "B") for r in b_case["runs"]]
        )
        assert "".join(s for _, s in starts) == "AB" * TINY.runs

    text = report.markdown(results)
    assert "mrpc / mrpc@HEAD, pinned RTT p50:" in text
    rows: list[dict[str, Any]] = compare.compare(mine, base)
    ratio = rows[-1]["metrics"]["p50"]["verdict"]
    print("pinned p50 ratio", ratio)
    assert ratio["runs"] == TINY.runs and 0.2 < ratio["median"] < 5
    assert set(rows[-1]["roles"]) >= {"client-app", "mrpcd-A", "mrpcd-B", "server-app"}
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").rglob("*.log"))
    assert "Traceback" not in logs
