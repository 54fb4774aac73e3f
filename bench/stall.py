"""What one live-upgrade run shows: the stall, latency before vs during, failures.

Pure functions over the client's per-call record (completion times and latencies
in ns of CLOCK_MONOTONIC, in completion order) and the runner's timestamps.

- *upgrade window*: from ``margin`` before the command started to ``margin``
  after it returned (``mrpcctl`` is a fresh Python process: its wall time holds
  ~0.2-0.4 s of interpreter start before the daemon sees the request).
- *stall*: the longest interval between consecutive completions that overlaps
  the upgrade window (so a pause that starts just before the window or ends
  just after it counts whole).
- *before window*: the same length, ending where the upgrade window starts (cut
  to what follows the warm-up if the steady phase was shorter); its longest
  gap is what the host's scheduling alone does to this load.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

from bench import stats

MARGIN_S = 0.5
WARMUP_S = 0.3
SWAP_SLACK_MS = 50  # how long before the logged end of a swap its pause may have begun
NS = 1_000_000_000


def longest_gap(done_ns: Sequence[int], lo: int, hi: int) -> tuple[int, int]:
    """(length ns, start ns) of the longest interval between consecutive completions that
    overlaps ``[lo, hi]``; the window edges stand in for a missing neighbour."""
    i0 = bisect.bisect_right(done_ns, lo)  # first completion after lo
    i1 = bisect.bisect_left(done_ns, hi)  # first completion at or after hi
    # the last completion up to lo and the first from hi on close the edge intervals
    points = list(done_ns[max(0, i0 - 1) : min(len(done_ns), i1 + 1)])
    if not points or points[0] > lo:
        points.insert(0, lo)
    if points[-1] < hi:
        points.append(hi)
    best, start = 0, lo
    for a, b in itertools.pairwise(points):
        if b - a > best:
            best, start = b - a, a
    return best, start


GC_SHARE = 1 / 3  # a gap is a collection's when pauses cover at least this share of it


def covered(a: int, b: int, spans: Sequence[tuple[int, int]]) -> int:
    """ns of [a, b] that ``spans`` ((start, end) ns, maybe overlapping each other) cover."""
    cuts = sorted((max(s, a), min(e, b)) for s, e in spans if s < b and e > a)
    total, reach = 0, a
    for s, e in cuts:
        s = max(s, reach)
        if e > s:
            total, reach = total + e - s, e
    return total


def longest_gap_clear_of(
    done_ns: Sequence[int], lo: int, hi: int, spans: Sequence[tuple[int, int]]
) -> int:
    """Length (ns) of the longest interval between consecutive completions that overlaps
    ``[lo, hi]`` and is not a collection's: ``spans`` ((start, end) ns, the GC pauses of
    any process) cover less than GC_SHARE of it."""
    i0 = bisect.bisect_right(done_ns, lo)
    i1 = bisect.bisect_left(done_ns, hi)
    points = list(done_ns[max(0, i0 - 1) : min(len(done_ns), i1 + 1)])
    if not points or points[0] > lo:
        points.insert(0, lo)
    if points[-1] < hi:
        points.append(hi)
    best = 0
    for a, b in itertools.pairwise(points):
        if b - a > best and covered(a, b, spans) < GC_SHARE * (b - a):
            best = b - a
    return best


def slot_gap_p90(done_ns: Sequence[int], lo: int, hi: int) -> float:
    """p90 over the consecutive slots of [lo, hi) as long as the swap's (SWAP_SLACK_MS + 5 ms)
    of each slot's longest gap: what the gap at the swap is without a swap (ns; nan if
    the window holds no whole slot)."""
    width = (SWAP_SLACK_MS + 5) * 1_000_000
    gaps = sorted(longest_gap(done_ns, t, t + width)[0] for t in range(lo, hi - width + 1, width))
    return stats.percentile(gaps, 90.0)


def window_latency(
    done_ns: Sequence[int], lat_ns: Sequence[int], lo: int, hi: int
) -> dict[str, float]:
    """p50/p99/max latency (µs) and rate (calls/s) of the calls that completed in [lo, hi)."""
    i0 = bisect.bisect_left(done_ns, lo)
    i1 = bisect.bisect_left(done_ns, hi)
    summary = stats.latency_summary(lat_ns[i0:i1])
    return {
        "calls": i1 - i0,
        "rate": (i1 - i0) / ((hi - lo) / NS) if hi > lo else float("nan"),
        "p50_us": summary["p50"],
        "p99_us": summary["p99"],
        "max_us": summary["max"],
    }


def analyze(
    done_ns: Sequence[int],
    lat_ns: Sequence[int],
    *,
    started_ns: int,
    cmd_start_ns: int,
    cmd_end_ns: int,
    swap_ns: int | None = None,
    margin_s: float = MARGIN_S,
    warmup_s: float = WARMUP_S,
) -> dict[str, Any]:
    """The figures of one run; times in the answer are seconds from ``started_ns``.

    ``swap_ns``: when the daemon logged the swap done (its log has ms resolution and
    is written right after the swap), if known; the answer then also has the longest
    gap overlapping the ``SWAP_SLACK_MS`` before it to 5 ms after it."""
    margin = int(margin_s * NS)
    lo, hi = cmd_start_ns - margin, cmd_end_ns + margin
    before_lo = max(started_ns + int(warmup_s * NS), lo - (hi - lo))
    gap, gap_at = longest_gap(done_ns, lo, hi)
    gap_before, gap_before_at = longest_gap(done_ns, before_lo, lo) if before_lo < lo else (0, lo)
    rel = lambda t: (t - started_ns) / NS
    at_swap: dict[str, Any] = {}
    if swap_ns is not None:
        g, g_at = longest_gap(done_ns, swap_ns - SWAP_SLACK_MS * 1_000_000, swap_ns + 5_000_000)
        at_swap = {
            "swap_at_s": rel(swap_ns),
            "gap_at_swap_ms": g / 1e6,
            "gap_at_swap_at_s": rel(g_at),
            "slot_gap_before_p90_ms": slot_gap_p90(done_ns, before_lo, lo) / 1e6,
        }
    return at_swap | {
        "command_s": (cmd_end_ns - cmd_start_ns) / NS,
        "window_s": [rel(lo), rel(hi)],
        "before_window_s": [rel(before_lo), rel(lo)],
        "stall_ms": gap / 1e6,
        "stall_at_s": rel(gap_at),
        "gap_before_ms": gap_before / 1e6,
        "gap_before_at_s": rel(gap_before_at),
        "before": window_latency(done_ns, lat_ns, before_lo, lo),
        "during": window_latency(done_ns, lat_ns, lo, hi),
    }


METRICS = (
    ("stall_ms", lambda r: r["stall_ms"]),
    ("gap_before_ms", lambda r: r["gap_before_ms"]),
    ("p50_before_us", lambda r: r["before"]["p50_us"]),
    ("p50_during_us", lambda r: r["during"]["p50_us"]),
    ("p99_before_us", lambda r: r["before"]["p99_us"]),
    ("p99_during_us", lambda r: r["during"]["p99_us"]),
    ("rate_before", lambda r: r["before"]["rate"]),
    ("rate_during", lambda r: r["during"]["rate"]),
    ("command_s", lambda r: r["command_s"]),
    ("gap_at_swap_ms", lambda r: r.get("gap_at_swap_ms", float("nan"))),
    ("slot_gap_before_p90_ms", lambda r: r.get("slot_gap_before_p90_ms", float("nan"))),
    ("swap_runtime_ms", lambda r: r.get("swap_runtime_ms", float("nan"))),
    ("stall_clear_of_gc_ms", lambda r: r.get("stall_clear_of_gc_ms", float("nan"))),
    ("gap_before_clear_of_gc_ms", lambda r: r.get("gap_before_clear_of_gc_ms", float("nan"))),
    ("stall_over_gap_before", lambda r: _ratio(r["stall_ms"], r["gap_before_ms"])),
    ("p99_during_over_before", lambda r: _ratio(r["during"]["p99_us"], r["before"]["p99_us"])),
)


def _ratio(a: float, b: float) -> float:
    return a / b if b and b > 0 else float("nan")


def summarize(runs: list[dict[str, Any]], goal_ms: float) -> dict[str, Any]:
    """Median [min-max] of every metric over the runs that completed, totals of the
    failures, and how many runs met the stall goal."""
    ok = [r for r in runs if "analysis" in r]
    out: dict[str, Any] = {
        "runs": len(runs),
        "completed": len(ok),
        "goal_ms": goal_ms,
        "calls": sum(r["client"]["calls"] for r in ok),
        "failed": sum(r["client"]["failed"] for r in ok),
        "mismatched": sum(r["client"]["mismatched"] for r in ok),
        "duplicates": sum(r["client"]["server"]["duplicates"] for r in ok),
        "unanswered": sum(r["unanswered"] for r in ok),
        "met": sum(1 for r in ok if r["analysis"]["stall_ms"] <= goal_ms),
        "codes": _codes(ok),
        "stall_gc_runs": sum(1 for r in ok if r["analysis"].get("gc_at_stall")),
        "gap_before_gc_runs": sum(1 for r in ok if r["analysis"].get("gc_at_gap_before")),
        "gc_probed": sum(1 for r in ok if "gc" in r),
        "full_gc": _full_gc(ok),
        "reconnects": sum(r["client"].get("reconnects", 0) for r in ok),
    }
    for name, get in METRICS:
        out[name] = stats.spread([get(r["analysis"]) for r in ok])
    return out


def _full_gc(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per process role: full (generation-2) collections during the load over the runs,
    their count per second of load, and their length in ms (median, max)."""
    by_role: dict[str, list[float]] = {}
    load_s = 0.0
    for r in runs:
        if "gc" not in r:  # the probe was off
            continue
        load_s += (r["client"]["stopped_ns"] - r["started_ns"]) / NS
        for p in r["gc"]:
            if p["generation"] == 2:
                by_role.setdefault(p["role"], []).append(p["ms"])
    out = {}
    for role, ms in sorted(by_role.items()):
        sp = stats.spread(ms)
        out[role] = {"count": len(ms), "per_s": len(ms) / load_s if load_s else 0.0} | sp
    return out


def _codes(runs: list[dict[str, Any]]) -> dict[str, int]:
    """Failed calls by gRPC status code name, over the runs."""
    out: dict[str, int] = {}
    for r in runs:
        for code, n in r["client"].get("codes", {}).items():
            out[code] = out.get(code, 0) + n
    return out
