"""The stall maths of ``python -m bench upgrade`` (bench/stall.py)."""

from __future__ import annotations

import math
from array import array

from bench import stall

MS = 1_000_000


def test_longest_gap_counts_a_pause_across_the_window_edge_whole() -> None:
    done = [0, 1 * MS, 2 * MS, 30 * MS, 31 * MS]
    assert stall.longest_gap(done, 0, 20 * MS) == (28 * MS, 2 * MS)  # ends after the window
    assert stall.longest_gap(done, 10 * MS, 40 * MS) == (28 * MS, 2 * MS)  # began before it
    assert stall.longest_gap(done, 30 * MS, 31 * MS) == (1 * MS, 30 * MS)


def test_longest_gap_with_no_completion_is_the_whole_window() -> None:
    assert stall.longest_gap([], 5 * MS, 9 * MS) == (4 * MS, 5 * MS)
    assert stall.longest_gap([1 * MS], 5 * MS, 9 * MS) == (8 * MS, 1 * MS)


def test_analyze_finds_the_pause_of_the_upgrade_and_compares_latency() -> None:
    # a completion every ms for 3 s with 1 ms latency, except a 40 ms pause at 2.0 s whose
    # calls then complete late (41 ms latency)
    done, lat = array("q"), array("q")
    for i in range(3000):
        if 2000 <= i < 2040:
            continue
        done.append(i * MS)
        lat.append(41 * MS if 2040 <= i < 2060 else 1 * MS)
    a = stall.analyze(
        done,
        lat,
        started_ns=0,
        cmd_start_ns=1900 * MS,
        cmd_end_ns=2100 * MS,
        swap_ns=2041 * MS,
    )
    assert a["stall_ms"] == 41.0 and a["stall_at_s"] == 1.999
    assert a["gap_before_ms"] == 1.0
    assert a["gap_at_swap_ms"] == 41.0 and a["slot_gap_before_p90_ms"] == 1.0
    assert a["window_s"] == [1.4, 2.6] and a["before_window_s"] == [0.3, 1.4]  # cut at warm-up
    assert a["before"]["p99_us"] == 1000.0 and a["during"]["p99_us"] == 41000.0
    assert a["command_s"] == 0.2


def test_summarize_totals_failures_and_counts_runs_that_met_the_goal() -> None:
    def run(stall_ms: float, failed: int) -> dict:
        a = {"stall_ms": stall_ms, "gap_before_ms": 1.0, "command_s": 0.2}
        a |= {k: {"p50_us": 1.0, "p99_us": 2.0, "rate": 5.0} for k in ("before", "during")}
        client = {"calls": 10, "failed": failed, "mismatched": 0, "server": {"duplicates": 0}}
        return {"analysis": a, "client": client, "unanswered": 0}

    s = stall.summarize([run(5, 0), run(20, 1), run(8, 0), {"error": "x"}], goal_ms=10)
    assert (s["runs"], s["completed"], s["met"], s["failed"], s["calls"]) == (4, 3, 2, 1, 30)
    assert s["stall_ms"] == {"median": 8, "min": 5, "max": 20, "runs": 3}


def test_slot_gaps_before_say_what_a_swap_sized_slot_shows_without_a_swap() -> None:
    # a completion every 2 ms over ten 55-ms slots; a 20-ms pause in one slot, then in two
    every = range(0, 550 * MS, 2 * MS)
    one = [t for t in every if not 60 * MS < t < 80 * MS]
    assert stall.slot_gap_p90(one, 0, 550 * MS) == 2 * MS  # the 9th of 10 slots is calm
    two = [t for t in one if not 170 * MS < t < 190 * MS]
    assert stall.slot_gap_p90(two, 0, 550 * MS) == 20 * MS
    assert math.isnan(stall.slot_gap_p90(every, 0, 50 * MS))  # no whole slot
