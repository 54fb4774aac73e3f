"""``python -m bench upgrade``: how long calls stall while mrpc is upgraded under load.

Every run of a scenario starts from scratch: two daemons (B, then A, each
``mrpcd run --listen 127.0.0.1:0`` with a fresh prefix), an echo server app on
B and a client app on A (``bench/upgrade_apps.py``) that keeps 64 calls in
flight and records the completion time and latency of every call. The client
runs steady for ``phase_s``; then the runner runs the scenario's command
(timestamps around it on the same CLOCK_MONOTONIC as the client's), waits
``phase_s`` more and stops the client, which drains its last calls, asks the
server how many calls it executed twice, and writes its arrays.
``bench/stall.py`` turns that into the stall and the latency before vs during.

Scenarios (``SCENARIOS``): a control (``mrpcctl list``: an operator command
that changes nothing, timed the same way); an engine upgrade with ``mrpcctl engine upgrade NAME
--file F --app bench-upgrade`` on daemon A, F a module subclassing the running
engine with VERSION + 1 (new code loaded as a fresh module, the state handed
over); and the daemon hot restart ``mrpcctl daemon restart`` of daemon A, which
is skipped with a note when this build's mrpcctl has no such command. Runs
alternate scenarios (A B C A B C ...) so drifting load on the host hits all.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import gcprobe, procs, stall, upgrade_envoy
from bench.systems.mrpc_systems import start_daemon
from bench.upgrade_apps import read_calls
from bench.upgrade_client import Client, add_gc, app_env
from bench.upgrade_plan import (  # noqa: F401 - the names python -m bench and the tests use
    CLIENT_APP,
    COMMAND_TIMEOUT_S,
    CONC,
    DEFAULT_SCENARIOS,
    FULL,
    NOT_AVAILABLE,
    QUICK,
    READY_TIMEOUT_S,
    RESULT_TIMEOUT_S,
    SCENARIOS,
    Scenario,
    UpgradePlan,
)

log = logging.getLogger(__name__)


def _ctl_argv(prefix: Path, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from mrpcd.ctl import main; main()",
        "--prefix",
        str(prefix),
    ] + args


def runtime_swap_ms(stdout: str) -> float | None:
    """The time the runtime spent on the swap (decompose to resume), from the
    command's JSON answer: no other work of that runtime ran meanwhile."""
    try:
        engines = json.loads(stdout).get("engines") or []
        return max(float(e["ms"]) for e in engines) if engines else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def ctl(prefix: Path, args: list[str], timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
    """Run ``mrpcctl --prefix PREFIX ARGS`` and time it (monotonic ns around the process)."""
    t0 = time.monotonic_ns()
    out = subprocess.run(
        _ctl_argv(prefix, args),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=procs.REPO_ROOT,
        env=procs.child_env(),
    )
    t1 = time.monotonic_ns()
    return {
        "argv": ["mrpcctl", "--prefix", str(prefix), *args],
        "rc": out.returncode,
        "stdout": out.stdout[-2000:],
        "stderr": out.stderr[-2000:],
        "start_ns": t0,
        "end_ns": t1,
    }


def restart_available() -> bool:
    """Whether this build's mrpcctl has ``daemon restart`` (asks its --help; no daemon)."""
    r = ctl(Path("/nonexistent"), ["daemon", "restart", "--help"], timeout=30)
    return r["rc"] == 0


def new_version(workdir: Path, module: str) -> Path:
    """A module whose engine subclasses ``module``'s with VERSION + 1: new code to load."""
    path = workdir / f"{module.rsplit('.', 1)[-1]}_next.py"
    path.write_text(
        f"from {module} import ENGINE as _Old\n\n\n"
        "class Next(_Old):\n    VERSION = _Old.VERSION + 1\n\n\nENGINE = Next\n"
    )
    return path


def run_once(
    scn: Scenario, run: int, plan: UpgradePlan, out: Path, workdir: Path
) -> dict[str, Any]:
    """One run of ``scn`` on fresh daemons; the record for results.json."""
    tag = f"{scn.name}-{run}"
    log_dir, base = out / "logs" / tag, workdir / tag
    calls_path = out / "calls" / f"{tag}.bin"
    calls_path.parent.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"scenario": scn.name, "run": run}
    started: list[procs.Proc] = []
    cpus = (0,) if plan.pinned else None
    try:
        daemon_env = lambda role: gcprobe.env(
            log_dir, role, probe=plan.gc_probe, full_gc=plan.daemon_gc
        )
        proc_b, info_b = start_daemon(
            "mrpcd-B", base / "B", log_dir, extra_env=daemon_env("mrpcd-B")
        )
        started.append(proc_b)
        proc_a, info_a = start_daemon(
            "mrpcd-A", base / "A", log_dir, extra_env=daemon_env("mrpcd-A")
        )
        started.append(proc_a)
        if cpus:
            procs.set_affinity_all_threads(procs.descendants([proc_a.pid, proc_b.pid]), cpus)
        plan.isolate(proc_a, proc_b)
        ready = base / "server.ready.json"
        server = procs.spawn(
            "server-app",
            procs.python_argv(
                "bench.upgrade_apps", "server", "--prefix", str(base / "B"), "--ready", str(ready)
            ),
            log_dir=log_dir,
            cpus=cpus,
            env=procs.child_env(app_env(plan, log_dir, "server-app")),
        )
        started.append(server)
        procs.wait_for_json(ready, READY_TIMEOUT_S, server)
        plan.isolate(server)
        if scn.engine and scn.policy:
            attach = ["policy", "attach", scn.engine, "--app", CLIENT_APP, "--side", "send"]
            attach += ["--future"] + [a for s in scn.sets for a in ("--set", s)]
            r = ctl(base / "A", attach)
            if r["rc"] != 0:
                raise RuntimeError(f"attaching {scn.engine} failed: {r['stderr'].strip()}")
        if plan.daemon_gc == "freeze":  # status runs a full collection: the probe freezes then,
            for prefix in (base / "B", base / "A"):  # before the load, not in its window
                ctl(prefix, ["status", "--json"])
        new_code = new_version(base, scn.module) if scn.module else None
        client = Client(
            procs.python_argv(
                "bench.upgrade_apps", "client", "--target", str(info_b["listen"]),
                "--prefix", str(base / "A"), "--out", str(calls_path), "--conc", str(CONC),
                "--name", CLIENT_APP,
            ),
            log_dir,
            cpus,
            app_env(plan, log_dir, "client-app"),
        )  # fmt: skip
        started.append(client.proc)
        client.expect("ready", READY_TIMEOUT_S)
        plan.isolate(client.proc)
        client.send("go")
        started_ns = client.expect("started", READY_TIMEOUT_S)["t_ns"]
        time.sleep(plan.phase_s)
        wall_offset = time.time_ns() - time.monotonic_ns()
        cmd = ctl(base / "A", scn.command(new_code))
        rec["command"] = cmd
        time.sleep(plan.phase_s)
        client.send("stop")
        res = client.expect("result", RESULT_TIMEOUT_S)
        rec["client"] = res
        rec["started_ns"] = started_ns
        if cmd["rc"] != 0:
            raise RuntimeError(
                f"{' '.join(cmd['argv'][3:])} failed ({cmd['rc']}): "
                f"{(cmd['stderr'] or cmd['stdout']).strip()[-400:]}"
            )
        srv = res["server"]
        rec["unanswered"] = max(0, srv["received"] - srv["duplicates"] - res["calls"])
        done, lat = read_calls(calls_path)
        rec["calls_file"] = str(calls_path.relative_to(out))
        rec["analysis"] = stall.analyze(
            done,
            lat,
            started_ns=started_ns,
            cmd_start_ns=cmd["start_ns"],
            cmd_end_ns=cmd["end_ns"],
            swap_ns=swap_logged_ns(log_dir / "mrpcd-A.log", wall_offset, cmd["start_ns"]),
        )
        add_gc(rec, log_dir, done)
        swap_ms = runtime_swap_ms(cmd["stdout"])
        if swap_ms is not None:
            rec["analysis"]["swap_runtime_ms"] = swap_ms
        rec["daemon_a_pid"] = [info_a.get("pid"), _state_pid(base / "A")]
    except Exception as exc:  # noqa: BLE001 - reported in the results, the next run goes on
        rec["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("%s: %s", tag, rec["error"])
    finally:
        for p in reversed(started):
            procs.stop(p)
        _stop_restarted(base / "A", started)
        rec["tracebacks"] = _tracebacks(log_dir)
    return rec


def swap_logged_ns(log_path: Path, wall_offset_ns: int, after_ns: int) -> int | None:
    """CLOCK_MONOTONIC ns of daemon A's first "upgraded ..." log line after ``after_ns``
    (its wall-clock stamp, ms resolution, moved by ``wall_offset_ns`` = wall - monotonic)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if "mrpcd.upgrade: upgraded" not in line:
            continue
        try:
            wall = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        t = int(wall * 1e9) - wall_offset_ns
        if t >= after_ns:
            return t
    return None


def _state_pid(prefix: Path) -> int | None:
    try:
        pid = json.loads((prefix / "mrpcd.json").read_text()).get("pid")
    except (OSError, ValueError):
        return None
    return pid if isinstance(pid, int) else None


def _stop_restarted(prefix: Path, started: list[procs.Proc]) -> None:
    """A hot-restarted daemon may run under a new pid, maybe outside the process group we
    started: end it by the pid its state file names (SIGTERM, SIGKILL after 3 s), if that
    process is still an mrpcd of this prefix and not one we stopped already."""
    pid = _state_pid(prefix)
    if pid is None or pid in {p.pid for p in started}:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _daemon_alive(pid, prefix):
            return
        try:
            os.kill(pid, sig)
        except OSError:
            return
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and _daemon_alive(pid, prefix):
            time.sleep(0.05)


def _daemon_alive(pid: int, prefix: Path) -> bool:
    """Whether ``pid`` is a live (not zombie) mrpcd whose command line names ``prefix``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
    return not zombie and b"mrpcd" in cmdline and str(prefix).encode() in cmdline


def _tracebacks(log_dir: Path) -> int:
    if not log_dir.exists():
        return 0
    return sum(p.read_text(errors="replace").count("Traceback") for p in log_dir.glob("*.log"))


def run(
    plan: UpgradePlan,
    names: list[str],
    out: Path,
    workdir: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every run of every scenario, alternating; the whole results.json."""
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "kind": "upgrade",
        "plan": asdict(plan),
        "gc_probe": plan.gc_probe,
        "conc": CONC,
        "margin_s": stall.MARGIN_S,
        "host": {
            "cpus": len(procs.ALL_CPUS),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "loadavg_start": list(os.getloadavg()),
        },
        "scenarios": {},
        "skipped": {},
    }

    active = []
    for name in names:
        scn = SCENARIOS[name]
        why = NOT_AVAILABLE if scn.restart and not restart_available() else None
        if scn.peer:
            why = upgrade_envoy.available()
        if why:
            progress(f"{name}: {why}")
            results["skipped"][name] = why
            continue
        active.append(scn)
        results["scenarios"][name] = {
            "what": scn.what,
            "goal_ms": scn.goal_ms,
            "control": scn.control,
            "peer": scn.peer,
            "versus": scn.versus,
            "runs": [],
        }
    for i in range(plan.runs):
        for scn in active:
            once = upgrade_envoy.run_once if scn.peer else run_once
            rec = once(scn, i, plan, out, workdir)
            results["scenarios"][scn.name]["runs"].append(rec)
            progress(_brief(rec))
    for name, sc in results["scenarios"].items():
        sc["summary"] = stall.summarize(sc["runs"], sc["goal_ms"])
    results["seconds"] = time.monotonic() - t0
    results["host"]["loadavg_end"] = list(os.getloadavg())
    return results


def _brief(rec: dict[str, Any]) -> str:
    head = f"{rec['scenario']} run {rec['run']}: "
    if "analysis" not in rec:
        return head + "FAILED: " + rec.get("error", "?")
    a, c = rec["analysis"], rec["client"]
    return head + (
        f"stall {a['stall_ms']:.1f} ms (before: {a['gap_before_ms']:.1f} ms), "
        f"p99 {a['before']['p99_us']:.0f} -> {a['during']['p99_us']:.0f} µs, "
        f"command {a['command_s']:.2f} s, {c['calls']} calls, {c['failed']} failed"
        + (f" {c['codes']}" if c.get("codes") else "")
        + (f", {c['reconnects']} reconnect(s)" if "reconnects" in c else "")
    )
