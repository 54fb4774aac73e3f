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
    extra: dict[str, Any] = field(default_factory=dict)

    def cases(self, workloads: tuple[str, ...]) -> list[Case]:
        out: list[Case] = []
        if "latency" in workloads:
            for mode in ("scheduled", "pinned"):
                out.append(Case("latency", mode, 1, 1, LATENCY_REQ))
        if "rate" in workloads:
            out += [Case("rate", "scheduled", c, 1, RATE_REQ) for c in self.rate_concs]
            out += [Case("rate", "scheduled", c, 2, RATE_REQ) for c in self.rate_two_client_concs]
        if "goodput" in workloads:
            sizes = self.goodput_sizes
            if workloads == ("goodput",):  # the stream reference: only the target size
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
)
