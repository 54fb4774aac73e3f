"""Garbage-collection pauses of the processes ``python -m bench upgrade`` starts.

The directory of this package holds a ``sitecustomize.py`` that Python imports at
start-up when the directory is on ``PYTHONPATH``: :func:`env` gives a bench child
that environment, and the child then logs its collections (see sitecustomize.py)
to ``<log_dir>/gc-<role>.<pid>``. :func:`pauses` reads them back; :func:`overlapping`
says which pauses overlap a gap between completions, so the report can say whether
a stall was a collection rather than the upgrade.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procs

PROBE_DIR = Path(__file__).resolve().parent
FULL_GC_VARIANTS = ("default", "no-full", "freeze")


@dataclass(frozen=True)
class Pause:
    role: str
    pid: int
    start_ns: int
    ns: int
    generation: int
    thread: str

    def brief(self) -> str:
        return f"{self.role} gen{self.generation} {self.ns / 1e6:.1f} ms ({self.thread})"


def env(log_dir: Path, role: str, *, probe: bool, full_gc: str = "default") -> dict[str, str]:
    """Extra environment for a bench child of ``role`` (for procs.child_env): the probe
    on its path, logging to ``log_dir`` if ``probe``; ``full_gc="no-full"``: no automatic
    full collections in that process (the diagnostic variant)."""
    if not probe and full_gc == "default":
        return {}
    path = os.environ.get("PYTHONPATH", "")
    out = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(procs.REPO_ROOT), str(PROBE_DIR), path) if p)
    }
    if probe:
        out["MRPC_BENCH_GC_LOG"] = str(log_dir / f"gc-{role}")
    if full_gc != "default":
        out["MRPC_BENCH_GC"] = full_gc
    return out


def pauses(log_dir: Path, lo_ns: int = 0, hi_ns: int = 2**62) -> list[Pause]:
    """Every logged pause that started in [lo_ns, hi_ns), by start time."""
    out = []
    for f in log_dir.glob("gc-*.*"):
        role, _, pid = f.name[3:].rpartition(".")
        if not pid.isdigit():
            continue
        for line in f.read_text(errors="replace").splitlines():
            parts = line.split(maxsplit=4)
            if len(parts) < 5 or not parts[0].isdigit():
                continue
            t0, dt = int(parts[0]), int(parts[1])
            if lo_ns <= t0 < hi_ns:
                out.append(Pause(role, int(pid), t0, dt, int(parts[2]), parts[4].strip()))
    return sorted(out, key=lambda p: p.start_ns)


def overlapping(ps: list[Pause], lo_ns: int, hi_ns: int, min_ns: int = 1_000_000) -> list[Pause]:
    """The pauses of at least ``min_ns`` that overlap [lo_ns, hi_ns]."""
    return [p for p in ps if p.ns >= min_ns and p.start_ns < hi_ns and p.start_ns + p.ns > lo_ns]


def record(ps: list[Pause], started_ns: int) -> list[dict[str, Any]]:
    """The pauses for results.json, times in s from ``started_ns``."""
    return [asdict(p) | {"at_s": (p.start_ns - started_ns) / 1e9, "ms": p.ns / 1e6} for p in ps]
