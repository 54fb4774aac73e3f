"""mrpc: two mrpcd daemons ("hosts" A and B on loopback), a server app on B and
client apps on A; ``mrpc-null`` adds the no-op policy engine on both daemons.

Apps only talk to their local daemon (shared memory + a unix control socket);
the daemons carry the calls over TCP. Single outstanding calls use the sync
stub (``stub.Echo(req)``); several outstanding calls per process use asyncio
tasks (``await stub.Echo.aio(req)``). Requests are built once and re-sent.

Bind time is measured before any workload, on extra daemons with fresh
prefixes: *cold* is the first app to bind the echo schema on a daemon whose
prefix has never seen it; *warm daemon* is a second app on that same daemon
(in-memory table); *cached* is an app on a daemon restarted on the same prefix
(on-disk binding cache, no protoc).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procs, stats
from bench.baseline import loaded_code, wrong_code
from bench.clients import run_inline, run_tasks
from bench.systems import StartContext, System, Unavailable, watch_parent

ECHO_PROTO = procs.REPO_ROOT / "schemas" / "echo.proto"
CALL_TIMEOUT_S = 30.0
FIRST_CALL_TIMEOUT_S = 10.0
DAEMON_START_TIMEOUT_S = 60.0
CLIENT_APP = "bench-client"  # the name client apps register with (policies attach by name)


def _api_problem() -> str | None:
    """Why the mrpc API is not usable yet, or None when it is."""
    try:
        import libmrpc
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return f"libmrpc does not import ({type(exc).__name__}: {exc})"
    missing = [n for n in ("connect", "load_proto", "Server") if not hasattr(libmrpc, n)]
    if missing:
        return (
            f"libmrpc has no {', '.join(missing)} yet (the mrpc API is still being built); "
            "this system runs once it lands"
        )
    import importlib.util

    if importlib.util.find_spec("mrpcd.__main__") is None:
        return "mrpcd has no __main__ yet (python -m mrpcd run is not available)"
    return None


def start_daemon(
    role: str,
    prefix: Path,
    log_dir: Path,
    root: Path = procs.REPO_ROOT,
    extra_env: dict[str, str] | None = None,
) -> tuple[procs.Proc, dict[str, Any]]:
    """``python -m mrpcd run --prefix PREFIX --listen 127.0.0.1:0`` with the code in ``root``;
    waits for mrpcd.json. The schema cache is ``PREFIX/cache`` whatever MRPC_CACHE_DIR says:
    daemons of different code trees never share generated code. ``extra_env``: more
    variables for the daemon (bench/upgrade.py: the GC probe)."""
    prefix.mkdir(parents=True, exist_ok=True)
    state = prefix / "mrpcd.json"
    state.unlink(missing_ok=True)
    proc = procs.spawn(
        role,
        procs.python_argv("mrpcd", "run", "--prefix", str(prefix), "--listen", "127.0.0.1:0"),
        log_dir=log_dir,
        env=procs.child_env(
            {"MRPC_CACHE_DIR": str(prefix / "cache"), **(extra_env or {})}, root=root
        ),
        root=root,
    )
    try:
        info = procs.wait_for_json(state, DAEMON_START_TIMEOUT_S, proc)
    except Exception:
        procs.stop(proc)
        raise
    if info.get("pid") and info["pid"] != proc.pid:
        proc.extra_pids.append(int(info["pid"]))
    return proc, info


def mrpcctl(prefix: Path, *args: str, timeout: float = 30.0, root: Path = procs.REPO_ROOT) -> str:
    """Run ``mrpcctl --prefix PREFIX ARGS`` (``mrpcd.ctl`` of the code in ``root``); raise on
    failure."""
    argv = [
        sys.executable,
        "-c",
        "from mrpcd.ctl import main; main()",
        "--prefix",
        str(prefix),
        *args,
    ]
    out = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
        env=procs.child_env(root=root),
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"mrpcctl {' '.join(args)} failed ({out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[-500:]}"
        )
    return out.stdout


# ----------------------------------------------------------------------------- server app


def serve_mrpc(args: argparse.Namespace, extra: list[str], ready: Callable[..., None]) -> None:
    import libmrpc

    p = argparse.ArgumentParser()
    p.add_argument("--prefix", required=True)
    opts = p.parse_args(extra)
    echo = libmrpc.load_proto(str(ECHO_PROTO))
    payload = b"r" * args.reply_size

    class Echo(echo.EchoServicer):  # type: ignore[name-defined,misc]
        def Echo(self, request: Any, context: Any) -> Any:
            return echo.EchoReply(payload=payload)

    # the echo handler never blocks: run it on the completion thread (like a grpc.aio
    # handler on its loop) instead of handing each request to a thread pool
    server = _make(libmrpc.Server, prefix=opts.prefix, name="bench-server", inline=True)
    server.add_servicer(Echo())
    server.start()
    ready({"prefix": opts.prefix, "code": loaded_code()})
    try:
        watch_parent(args.lifetime)
    finally:
        server.stop(0)


def _make(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments it accepts (``name`` is optional API)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(**kwargs)


# ----------------------------------------------------------------------------- client app


class MrpcClient:
    """Sync stub for one outstanding call, asyncio tasks for several."""

    def __init__(self, server: dict[str, Any], case: dict[str, Any]) -> None:
        self.target = server["target"]
        self.prefix = server["prefix"]
        self.app_name: str | None = case.get("app_name") or server.get("client_app")
        self.channel: Any = None

    def open(self) -> dict[str, Any]:
        import libmrpc

        self.echo = libmrpc.load_proto(str(ECHO_PROTO))
        # The app name operators attach policies by (several processes may share it).
        name = self.app_name or f"bench-client-{os.getpid()}"
        self.channel = _make(libmrpc.connect, target=self.target, prefix=self.prefix, name=name)
        self.stub = self.echo.EchoStub(self.channel)
        self.stub.Echo(self.echo.EchoRequest(payload=b"hello"), timeout=FIRST_CALL_TIMEOUT_S)
        return {"app": name, "code": loaded_code()}

    def window(self, conc: int, req_size: int, duration: float, max_calls: int) -> Any:
        req = self.echo.EchoRequest(payload=b"x" * req_size)
        if conc == 1:
            call = self.stub.Echo
            return run_inline(lambda: call(req, timeout=CALL_TIMEOUT_S), duration, max_calls)
        aio = self.stub.Echo.aio
        return run_tasks(lambda: aio(req, timeout=CALL_TIMEOUT_S), conc, duration, max_calls)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()


class _BindLog(logging.Handler):
    """Collects libmrpc's "bound schema ... (how, X ms)" log line, if it logs one."""

    PATTERN = re.compile(r"bound schema \S+ as slot \d+ \((\w+), ([\d.]+) ms\)")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.how: str | None = None
        self.daemon_ms: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = self.PATTERN.search(record.getMessage())
        if m:
            self.how, self.daemon_ms = m.group(1), float(m.group(2))


def bind_probe(argv: list[str]) -> None:
    """``python -c 'from bench.systems.mrpc_systems import bind_probe; ...' TARGET PREFIX``:
    time one fresh app's load_proto, connect + stub, and first call; print JSON."""
    target, prefix = argv
    handler = _BindLog()
    lg = logging.getLogger("libmrpc")
    lg.setLevel(logging.INFO)
    lg.addHandler(handler)
    lg.propagate = False
    t0 = time.perf_counter()
    import libmrpc

    t1 = time.perf_counter()
    echo = libmrpc.load_proto(str(ECHO_PROTO))
    t2 = time.perf_counter()
    channel = _make(libmrpc.connect, target=target, prefix=prefix, name=f"bind-{os.getpid()}")
    stub = echo.EchoStub(channel)
    t3 = time.perf_counter()
    stub.Echo(echo.EchoRequest(payload=b"x"), timeout=CALL_TIMEOUT_S)
    t4 = time.perf_counter()
    channel.close()
    print(
        json.dumps(
            {
                "import_ms": (t1 - t0) * 1e3,
                "load_proto_ms": (t2 - t1) * 1e3,
                "connect_ms": (t3 - t2) * 1e3,
                "first_call_ms": (t4 - t3) * 1e3,
                "bind_ms": (t4 - t2) * 1e3,
                "how": handler.how,
                "daemon_bind_ms": handler.daemon_ms,
            }
        )
    )


def _run_probe(target: str, prefix: Path, root: Path = procs.REPO_ROOT) -> dict[str, Any]:
    code = "import sys; from bench.systems.mrpc_systems import bind_probe; bind_probe(sys.argv[1:])"
    out = subprocess.run(
        [sys.executable, "-c", code, target, str(prefix)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env=procs.child_env(root=root),
    )
    if out.returncode != 0:
        raise RuntimeError(f"bind probe failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- systems


class Mrpc(System):
    name = "mrpc"
    summary = (
        "client app -> mrpcd A -> TCP -> mrpcd B -> server app (shared memory between "
        "apps and daemons)"
    )
    driver = "bench.systems.mrpc_systems:MrpcClient"
    has_bind_time = True
    has_baseline = True
    experiments = ("qos",)
    policy: str | None = None  # attached on both daemons to every app (--all --future)
    # (engine, --set pairs): attached on daemon A to the client app, send side
    client_policy: tuple[str, tuple[str, ...]] | None = None

    def check(self) -> None:
        problem = _api_problem()
        if problem:
            raise Unavailable(problem)

    def start(self, ctx: StartContext) -> dict[str, Any]:
        self.ctx = ctx
        self.dir_a, self.dir_b = ctx.workdir / "A", ctx.workdir / "B"
        proc_b, info_b = start_daemon("mrpcd-B", self.dir_b, ctx.log_dir, self.code_root)
        self.procs.append(proc_b)
        proc_a, info_a = start_daemon("mrpcd-A", self.dir_a, ctx.log_dir, self.code_root)
        self.procs.append(proc_a)
        self.target = info_b["listen"]
        attached = self.attach_policy() if self.policy else []
        if self.client_policy:
            attached.append(self.attach_client_policy())
        self.policy_check: dict[str, Any] | None = None
        ready = self.start_server(ctx, "mrpc", "server-app", "--prefix", str(self.dir_b))
        problem = wrong_code(ready.get("code", {}), self.code_root)
        if problem:
            raise RuntimeError(f"the server app {problem}")
        return {
            "target": self.target,
            "prefix": str(self.dir_a),
            "client_app": CLIENT_APP,
            "daemon_a": info_a,
            "daemon_b": info_b,
            "policy": self.policy or (self.client_policy[0] if self.client_policy else None),
            "policy_attach": attached,
            "cache_dirs": [str(self.dir_a / "cache"), str(self.dir_b / "cache")],
            "code_root": str(self.code_root),
        }

    def attach_policy(self) -> list[str]:
        """Attach ``self.policy`` on both daemons to every app, present and future."""
        return [
            mrpcctl(
                prefix,
                "policy",
                "attach",
                str(self.policy),
                "--all",
                "--future",
                root=self.code_root,
            ).strip()
            for prefix in (self.dir_a, self.dir_b)
        ]

    def attach_client_policy(self) -> str:
        """Attach ``self.client_policy`` on daemon A to the client app (a standing rule by
        name, so every client process of every case gets its own engine), send side."""
        assert self.client_policy is not None
        engine, sets = self.client_policy
        argv = ["policy", "attach", engine, "--app", CLIENT_APP, "--side", "send", "--future"]
        for pair in sets:
            argv += ["--set", pair]
        return mrpcctl(self.dir_a, *argv, root=self.code_root).strip()

    def on_clients_ready(self, client_infos: list[dict[str, Any]]) -> None:
        """Once per system: check on daemon A that every client app has the engine."""
        if not self.client_policy or self.policy_check is not None:
            return
        engine = self.client_policy[0]
        try:
            listing = json.loads(mrpcctl(self.dir_a, "list", "--json", root=self.code_root))
            counters = json.loads(mrpcctl(self.dir_a, "stats", "--json", root=self.code_root))
        except Exception as exc:  # noqa: BLE001 - reported, the case still runs
            self.policy_check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            return
        apps = [a for a in listing.get("apps", []) if a.get("name") == CLIENT_APP]
        engines = {
            a["pid"]: [e["id"] for e in a.get("datapath", []) if e.get("engine") == engine]
            for a in apps
        }
        stats_rows = [
            e
            for a in counters.get("apps", [])
            if a.get("app") == CLIENT_APP
            for e in a.get("engines", [])
            if e.get("engine") == engine
        ]
        self.policy_check = {
            "ok": bool(apps) and all(engines.values()) and len(apps) == len(client_infos),
            "client_apps": len(apps),
            "engines": engines,
            "stats_after_first_call": [r.get("stats", {}) for r in stats_rows],
        }

    def run_experiment(
        self, name: str, server_info: dict[str, Any], plan: Any, log_dir: Path, progress: Any
    ) -> dict[str, Any]:
        from bench import qos

        assert name == "qos"
        return qos.run(self, server_info, plan, log_dir, progress)

    def extra(self, ctx: StartContext) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.policy_check is not None:
            out["policy_check"] = self.policy_check
        if self.has_bind_time:
            out["bind"] = self.measure_bind(ctx, runs=3)
        return out

    def measure_bind(self, ctx: StartContext, runs: int) -> dict[str, Any]:
        samples: dict[str, list[dict[str, Any]]] = {"cold": [], "warm daemon": [], "cached": []}
        error = None
        for i in range(runs):
            prefix = ctx.workdir / f"bind-{i}"
            proc: procs.Proc | None = None
            try:
                for phase in ("cold", "warm daemon", "cached"):
                    if phase == "cached" and proc is not None:  # restart on the warm prefix
                        procs.stop(proc)
                    if phase != "warm daemon":
                        proc, _ = start_daemon(
                            f"mrpcd-bind-{i}", prefix, ctx.log_dir, self.code_root
                        )
                    samples[phase].append(_run_probe(self.target, prefix, self.code_root))
            except Exception as exc:  # noqa: BLE001 - reported in the results
                error = f"{type(exc).__name__}: {exc}"
                break
            finally:
                if proc is not None:
                    procs.stop(proc)
        out: dict[str, Any] = {"samples": samples, "phases": {}}
        for phase, rows in samples.items():
            if rows:
                daemon = [r["daemon_bind_ms"] for r in rows if r.get("daemon_bind_ms") is not None]
                out["phases"][phase] = {
                    "app_ms": stats.spread([r["bind_ms"] for r in rows]),
                    "daemon_ms": stats.spread(daemon) if daemon else None,
                    "load_proto_ms": stats.spread([r["load_proto_ms"] for r in rows]),
                    "levels": sorted({str(r.get("how")) for r in rows}),
                }
        if error:
            out["error"] = error
        return out


class MrpcNull(Mrpc):
    name = "mrpc-null"
    summary = "mrpc with the no-op policy engine attached on both daemons (policy overhead)"
    has_bind_time = False
    experiments = ()
    policy = "null"


# Never limits: 10^8 tokens, refilled to 10^8 every second.
RATELIMIT_NEVER = ("max_tokens=100000000", "tokens_per_fill=100000000", "fill_interval=1s")
# Allows everything; still reads every request's payload for one deny rule that never matches
# (acl compares bytes fields as text: no payload starts with NUL + "never").
ACL_NEVER = (
    "default=allow",
    'rules=[{name: never, action: deny, field: payload, prefix: "\\u0000never"}]',
)


class MrpcRatelimit(Mrpc):
    name = "mrpc-ratelimit"
    summary = (
        "mrpc with ratelimit on the client app (daemon A, send side) at a limit it never "
        "reaches (10^8 tokens per second)"
    )
    has_bind_time = False
    experiments = ()
    client_policy = ("ratelimit", RATELIMIT_NEVER)


class MrpcAcl(Mrpc):
    name = "mrpc-acl"
    summary = (
        "mrpc with acl on the client app (daemon A, send side): default allow, one deny rule "
        "on the payload field that never matches"
    )
    has_bind_time = False
    experiments = ()
    client_policy = ("acl", ACL_NEVER)


SYSTEMS = (Mrpc, MrpcNull, MrpcRatelimit, MrpcAcl)
SERVERS = {"mrpc": "bench.systems.mrpc_systems:serve_mrpc"}
