"""Smoke test of ``python -m bench upgrade``: one quick run of the policy scenario on real
daemons (bench/upgrade.py, bench/upgrade_apps.py, bench/stall.py, bench/upgrade_report.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import procs


def test_quick_upgrade_bench_measures_a_ratelimit_upgrade(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bench", "upgrade", "--quick", "--runs", "1", "--phase", "1"]
    argv += ["--scenarios", "ratelimit,daemon-restart", "--out", str(out)]
    t0 = time.monotonic()
    r = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=procs.REPO_ROOT,
        env=procs.child_env(),
    )
    print(f"took {time.monotonic() - t0:.1f}s\n{r.stderr}")
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    (rec,) = results["scenarios"]["ratelimit"]["runs"]
    assert "error" not in rec, rec["error"]
    a, client = rec["analysis"], rec["client"]
    assert client["calls"] > 1000 and client["failed"] == 0, client
    assert client["mismatched"] == 0 and client["server"]["duplicates"] == 0
    assert client["server"]["received"] >= client["calls"]  # the server counted each call
    assert math.isfinite(a["stall_ms"]) and a["stall_ms"] > 0
    assert "swap_at_s" in a, "daemon A's 'upgraded ... from v1 to v2' line was not found"
    assert a["window_s"][0] < a["swap_at_s"] < a["window_s"][1]
    assert rec["tracebacks"] == 0
    assert "| ratelimit | ≤ 10 ms |" in r.stdout  # the table is printed
    # the GC probe ran in every process: the daemons' collections are in the record and the
    # stall was also measured over the gaps clear of any collection
    assert {"mrpcd-A", "mrpcd-B", "client-app", "server-app"} <= {
        p.name[3:].rpartition(".")[0] for p in (out / "logs" / "ratelimit-0").glob("gc-*")
    }
    assert 0 < a["stall_clear_of_gc_ms"] <= a["stall_ms"]
    assert "## Garbage collection pauses (the GC probe)" in r.stdout
    if "daemon-restart" in results["skipped"]:  # this build has no `mrpcctl daemon restart`
        assert "daemon hot restart: not available in this build" in r.stderr
    else:  # the bench ran it: the run completed (its figures are the hot restart's business)
        (restart,) = results["scenarios"]["daemon-restart"]["runs"]
        assert "analysis" in restart, restart.get("error")
        assert restart["tracebacks"] == 0  # nor in the successor's log (the GC probe's fd)
        print("daemon restart:", restart["analysis"]["stall_ms"], "ms,", restart["client"])
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "upgrade_ratelimit.png"
        assert png.stat().st_size > 10_000
        assert "![upgrade_ratelimit.png](upgrade_ratelimit.png)" in (out / "results.md").read_text()


def _envoy_missing() -> str | None:
    from bench import upgrade_envoy

    return upgrade_envoy.available()


def test_quick_upgrade_bench_runs_envoy_hot_restart_next_to_mrpc(tmp_path: Path) -> None:
    """The peer scenarios: grpc.aio -> Envoy -> Envoy -> grpc.aio under the same load, a real
    Envoy hot restart (epoch 1 takes over), a policy attached by LDS and a plain restart,
    next to mrpc's hot restart."""
    why = _envoy_missing()
    if why:
        pytest.skip(why)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bench", "upgrade", "--runs", "1", "--phase", "0.7"]
    argv += ["--scenarios", "daemon-restart,envoy-hot-restart,envoy-policy,envoy-restart"]
    argv += ["--out", str(out)]
    shm_before = set(Path("/dev/shm").glob("envoy_shared_memory_*"))
    t0 = time.monotonic()
    r = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=procs.REPO_ROOT,
        env=procs.child_env(),
    )
    print(f"took {time.monotonic() - t0:.1f}s\n{r.stderr}")
    assert r.returncode == 0, r.stderr[-2000:]
    left = set(Path("/dev/shm").glob("envoy_shared_memory_*")) - shm_before
    assert not left, f"the hot-restarted Envoy's shared memory was left behind: {left}"
    results = json.loads((out / "results.json").read_text())
    (hot,) = results["scenarios"]["envoy-hot-restart"]["runs"]
    assert "error" not in hot, hot["error"]
    assert hot["client"]["calls"] > 200, hot["client"]
    # the new Envoy (epoch 1) took over the listener and answered calls after the old one left
    assert hot["envoy_a_stats"]["server.hot_restart_epoch"] == 1, hot["envoy_a_stats"]
    assert hot["envoy_a_stats"]["http.ingress.downstream_rq_total"] > 0
    assert hot["command"]["rc"] == 0  # the old Envoy exited by itself, after its drain
    assert hot["analysis"]["command_s"] >= 2.5  # --parent-shutdown-time-s 3, from epoch 1's start
    (policy,) = results["scenarios"]["envoy-policy"]["runs"]
    assert "error" not in policy, policy["error"]
    st = policy["envoy_a_stats"]  # Envoy took the new listener by LDS, the filter saw calls
    assert st["listener_manager.lds.update_success"] == 2, st
    assert st["policy_ratelimit.http_local_rate_limit.enabled"] > 0, st
    assert st["policy_ratelimit.http_local_rate_limit.rate_limited"] == 0, st
    (plain,) = results["scenarios"]["envoy-restart"]["runs"]
    assert "error" not in plain, plain["error"]
    c = plain["client"]
    # killing the proxy under 64 calls in flight loses calls; each failure has a status code
    assert c["failed"] + plain["unanswered"] > 0, c
    assert sum(c["codes"].values()) == c["failed"], c
    assert c["reconnects"] >= 1, c["channel_states"]
    print("envoy hot restart:", hot["analysis"]["stall_ms"], "ms; plain:", plain["analysis"])
    if "daemon-restart" not in results["skipped"]:  # the side-by-side table is printed
        assert "## mrpc vs Envoy, the same operator action" in r.stdout
        assert "| restart the process under live connections (hot restart) | Envoy: " in r.stdout
