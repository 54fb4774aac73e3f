"""What a benchmark run measures: cases, durations, repeats (quick vs. full)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KIB = 1024
MIB = 1024 * 1024

LATENCY_REQ = 64
RATE_REQ = 32
REPLY_SIZE = 8
RATE_TARGET_CONC = 64
GOODPUT_TARGET_SIZE = 8 * MIB
MAX_CALLS = 2_000_000  # per window and client; every window is bounded in count and time
# runs per case with --baseline: from 12 runs on, the noise band ignores the one most extreme
# run on each side (bench/compare.py), so one window starved by other work does not set it
BASELINE_MIN_RUNS = 12


@dataclass(frozen=True)
class Case:
    workload: str  # latency | rate | goodput
    mode: str  # pinned (all processes on CPU 0) | scheduled
    conc: int  # outstanding calls per client process
    clients: int  # client processes
    req_size: int

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.mode}/c{self.conc}x{self.clients}/{self.req_size}B"

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"key": self.key}


@dataclass(frozen=True)
class Plan:
    quick: bool
    runs: int
    lat_duration: float
    rate_duration: float
    goodput_duration: float
    warmup: float
    rate_concs: tuple[int, ...]
    rate_two_client_concs: tuple[int, ...]
    goodput_sizes: tuple[int, ...]
    sample_interval: float = 0.1
    # qos workload (bench/qos.py): windows per phase, and the qos settings tried
    qos_runs: int = 3
    qos_duration: float = 2.0
    qos_warmup: float = 0.3
    qos_variants: tuple[dict[str, Any], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def cases(self, workloads: tuple[str, ...] | list[str]) -> list[Case]:
        out: list[Case] = []
        if "latency" in workloads:
            for mode in ("scheduled", "pinned"):
                out.append(Case("latency", mode, 1, 1, LATENCY_REQ))
        if "rate" in workloads:
            out += [Case("rate", "scheduled", c, 1, RATE_REQ) for c in self.rate_concs]
            out += [Case("rate", "scheduled", c, 2, RATE_REQ) for c in self.rate_two_client_concs]
        if "goodput" in workloads:
            sizes = self.goodput_sizes
            if tuple(workloads) == ("goodput",):  # the stream reference: only the target size
                sizes = (GOODPUT_TARGET_SIZE,)
            out += [Case("goodput", "scheduled", 1, 1, s) for s in sizes]
        return out

    def duration(self, case: Case) -> float:
        return {
            "latency": self.lat_duration,
            "rate": self.rate_duration,
            "goodput": self.goodput_duration,
        }[case.workload]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Every qos variant attaches qos on daemon A to both client apps (the latency app with
# latency_sensitive=true) with the "bulk" settings; "receive" also attaches qos on daemon B to
# the server app's receive side with those settings. The time-based variants hold bulk calls
# while priority traffic was seen within priority_window (50ms: the latency app calls every
# few ms, so bulk calls wait max_delay each). The bulk_inflight variants are work-conserving:
# they cap the bulk app's calls in flight downstream, so a latency call queues behind at most
# that many bulk calls, and bulk keeps the pipe full.
QOS_ALWAYS = ("small_threshold=0", "priority_window=50ms")
QOS_DEFAULTS = {"name": "qos defaults", "bulk": []}
QOS_A_1MS = {"name": "qos A, max_delay 1ms", "bulk": [*QOS_ALWAYS, "max_delay=1ms"]}
QOS_A_2MS = {"name": "qos A, max_delay 2ms", "bulk": [*QOS_ALWAYS, "max_delay=2ms"]}
QOS_AB_1MS = {
    "name": "qos A + B receive, max_delay 1ms",
    "bulk": [*QOS_ALWAYS, "max_delay=1ms"],
    "receive": ["priority_window=50ms", "max_delay=1ms"],
}
QOS_CAP_8 = {"name": "qos A, bulk_inflight 8", "bulk": ["bulk_inflight=8"]}
QOS_CAP_16 = {"name": "qos A, bulk_inflight 16", "bulk": ["bulk_inflight=16"]}
QOS_AB_CAP_8 = {
    "name": "qos A + B receive, bulk_inflight 8",
    "bulk": ["bulk_inflight=8"],
    "receive": ["bulk_inflight=8"],
}

FULL = Plan(
    quick=False,
    runs=3,
    lat_duration=1.5,
    rate_duration=0.8,
    goodput_duration=0.8,
    warmup=0.2,
    rate_concs=(1, 8, 32, 64, 128),
    rate_two_client_concs=(1, 8, 32, 64, 128),
    goodput_sizes=(8 * KIB, 64 * KIB, MIB, 8 * MIB),
    qos_runs=5,
    qos_duration=1.5,
    qos_variants=(QOS_DEFAULTS, QOS_A_1MS, QOS_AB_1MS, QOS_CAP_8, QOS_CAP_16, QOS_AB_CAP_8),
)

QUICK = Plan(
    quick=True,
    runs=3,
    lat_duration=0.3,
    rate_duration=0.3,
    goodput_duration=0.3,
    warmup=0.1,
    rate_concs=(1, 64),
    rate_two_client_concs=(64,),
    goodput_sizes=(64 * KIB, 8 * MIB),
    qos_runs=2,
    qos_duration=1.5,
    qos_variants=(QOS_CAP_16,),
)
