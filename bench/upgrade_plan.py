"""What ``python -m bench upgrade`` runs: its scenarios and its plan (bench/upgrade.py runs
them; bench/upgrade_envoy.py runs the peer's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.systems.mrpc_systems import RATELIMIT_NEVER

CLIENT_APP = "bench-upgrade"
CONC = 64
READY_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 90.0
ENGINE_GOAL_MS = 10.0
RESTART_GOAL_MS = 100.0
NOT_AVAILABLE = "daemon hot restart: not available in this build"
RT_PRIORITY = 10  # --rt: SCHED_RR priority of the measured processes (chrt -r 10)
NICE = -20  # --nice: their nice value (SCHED_OTHER; a CPU share ~87 times a nice-0 process's)


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str  # one line for the report
    goal_ms: float
    engine: str | None = None  # engine upgrade: the engine's name ...
    module: str | None = None  # ... and the module the new version subclasses
    policy: bool = False  # attach ``engine`` as a policy first, with these --set pairs:
    sets: tuple[str, ...] = ()
    restart: bool = False  # daemon hot restart instead
    control: str = ""  # no upgrade: this read-only mrpcctl command, what any command costs
    peer: str | None = None  # the peer through Envoy sidecars instead (bench/upgrade_envoy.py):
    # "hot-restart" (Envoy's hot restart of the client's sidecar) or "restart" (stop + start)
    versus: str | None = None  # the mrpc scenario doing the same operator action

    def command(self, new_code: Path | None) -> list[str]:
        """The mrpcctl arguments (after ``--prefix A``) this scenario runs."""
        if self.restart:
            return ["daemon", "restart", "--json"]
        if self.control:
            return [self.control, "--json"]
        assert self.engine is not None and new_code is not None
        return [
            "engine", "upgrade", self.engine, "--file", str(new_code), "--app", CLIENT_APP, "--json"
        ]  # fmt: skip


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "control",
            "control, no upgrade: `mrpcctl list --json` on daemon A, timed the same way "
            "(what starting an operator command does to the load)",
            ENGINE_GOAL_MS,
            control="list",
        ),
        Scenario(
            "status",
            "no upgrade: `mrpcctl status --json` on daemon A (its answer counts the bind "
            "cache after a full `gc.collect()` in the daemon: mrpcd/binding.py Bindings.stats)",
            ENGINE_GOAL_MS,
            control="status",
        ),
        Scenario(
            "ratelimit",
            "policy: ratelimit on the client app (daemon A, send side, a limit never reached) "
            "upgraded to a new version",
            ENGINE_GOAL_MS,
            "ratelimit",
            "engines.ratelimit",
            policy=True,
            sets=RATELIMIT_NEVER,
        ),
        Scenario(
            "metrics",
            "policy: metrics on the client app (daemon A, send side) upgraded",
            ENGINE_GOAL_MS,
            "metrics",
            "engines.metrics",
            policy=True,
        ),
        Scenario(
            "tcp",
            "transport: the client app's tcp engine on daemon A (its open connection to B "
            "handed over) upgraded",
            ENGINE_GOAL_MS,
            "tcp",
            "engines.tcp",
        ),
        Scenario(
            "frontend",
            "frontend: the client app's frontend on daemon A (its rings) upgraded",
            ENGINE_GOAL_MS,
            "frontend",
            "engines.frontend",
        ),
        Scenario(
            "daemon-restart",
            "daemon hot restart of daemon A (`mrpcctl daemon restart`) under the client app",
            RESTART_GOAL_MS,
            restart=True,
        ),
        Scenario(
            "envoy-hot-restart",
            "peer: grpc.aio client -> Envoy A -> Envoy B -> grpc.aio server, the same load; "
            "Envoy's hot restart of Envoy A (the client's sidecar): a second Envoy with "
            "`--restart-epoch 1` and the same `--base-id` takes the listener, the old one "
            "drains for 2 s (`--drain-time-s 2`) and is ended after 3 s "
            "(`--parent-shutdown-time-s 3`); the interval runs to the old process's exit",
            RESTART_GOAL_MS,
            peer="hot-restart",
            versus="daemon-restart",
        ),
        Scenario(
            "envoy-policy",
            "peer: the same, a policy attached to Envoy A its own way without a restart: its "
            "listener file (LDS from the filesystem) replaced with an HTTP local rate limit "
            "filter added (10^8 tokens/s: never limits); Envoy drains the old filter chain's "
            "connections (`--drain-time-s 2`); the interval runs to the update applied and "
            "drained",
            ENGINE_GOAL_MS,
            peer="policy",
            versus="ratelimit",
        ),
        Scenario(
            "envoy-restart",
            "peer: the same, Envoy A stopped (SIGTERM) and started again on the same port "
            "(a config change without hot restart); the interval runs to the new Envoy "
            "listing its listener",
            RESTART_GOAL_MS,
            peer="restart",
            versus="daemon-restart",
        ),
    )
}
DEFAULT_SCENARIOS = (
    "control", "ratelimit", "metrics", "tcp", "daemon-restart", "envoy-hot-restart",
    "envoy-policy", "envoy-restart",
)  # fmt: skip


@dataclass(frozen=True)
class UpgradePlan:
    runs: int = 5
    phase_s: float = 2.0  # steady load before the command, and load after it
    pinned: bool = False  # every app and daemon thread on CPU 0 (default: scheduled)
    gc_probe: bool = True  # log every process's GC pauses (bench/gcprobe), matched to gaps
    daemon_gc: str = "default"  # "no-full": diagnostic variant, daemons without full GCs
    rt: bool = False  # variant: every app, daemon and Envoy thread SCHED_RR (RT_PRIORITY)
    nice: bool = False  # variant: the same threads at nice NICE

    def isolate(self, *procs_: procs.Proc | int) -> None:
        """Apply the plan's priority variant to these processes (and their threads and
        children)."""
        pids = procs.descendants([p if isinstance(p, int) else p.pid for p in procs_])
        if self.rt and not procs.set_rt_all_threads(pids, RT_PRIORITY):
            raise RuntimeError("--rt: could not set SCHED_RR (needs CAP_SYS_NICE / root)")
        if self.nice and not procs.set_nice_all_threads(pids, NICE):
            raise RuntimeError(f"--nice: could not set nice {NICE} (needs CAP_SYS_NICE / root)")


FULL = UpgradePlan()
QUICK = UpgradePlan(runs=2, phase_s=1.5)
