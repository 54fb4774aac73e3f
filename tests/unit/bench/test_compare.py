"""The working-tree / baseline ratio maths of ``--baseline`` (bench/compare.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench import compare


def _run(i: int, p50: float, rate: float, count: int = 1000, **cpu: float) -> dict[str, Any]:
    return {
        "run": i,
        "count": count,
        "rate": rate,
        "lat": {"p50": p50, "p99": p50 * 2},
        "cpu_us_per_rpc": sum(cpu.values()) / count * 1e6 if cpu else math.nan,
        "cpu_s": cpu,
    }


def test_paired_ratios_pair_by_run_index_and_skip_unusable_runs() -> None:
    mine = [_run(0, 110, 1), _run(1, 120, 1), _run(2, 130, 1), _run(3, 100, 1, count=0)]
    base = [_run(2, 100, 1), _run(0, 100, 1), _run(3, 100, 1)]  # run 1 missing, order differs
    ratios = compare.paired_ratios(mine, base, lambda r: r["lat"]["p50"])
    assert ratios == pytest.approx([1.10, 1.30])  # run 1: no partner; run 3: no calls
    assert (
        compare.paired_ratios([_run(0, 1, 1)], [_run(0, 0.0, 1)], lambda r: r["lat"]["p50"]) == []
    )


def test_noise_band_is_half_the_ratio_range_with_a_floor() -> None:
    assert compare.noise_band([0.9, 1.0, 1.2]) == pytest.approx(0.15)
    assert compare.noise_band([1.00, 1.01, 1.02]) == compare.NOISE_FLOOR
    assert compare.noise_band([1.0, 1.01], floor=0.0) == pytest.approx(0.005)
    assert math.isnan(compare.noise_band([]))


def test_verdict_flags_a_latency_regression_beyond_the_band() -> None:
    v = compare.verdict([1.10, 1.12, 1.11, 1.13, 1.12], higher_is_better=False)
    assert v.regression
    assert v.text == "regression 1.12"
    assert v.band == pytest.approx(compare.NOISE_FLOOR)
    assert (v.min, v.max, v.runs) == (1.10, 1.13, 5)


def test_verdict_within_the_band_is_no_regression() -> None:
    v = compare.verdict([0.92, 1.15, 1.08, 1.0, 1.05], higher_is_better=False)
    assert not v.regression  # median 1.05 < 1 + (1.15 - 0.92) / 2
    assert v.band == pytest.approx(0.115)
    assert v.text == "no regression (within ±11.5 %)"


def test_verdict_for_rate_regresses_when_the_ratio_drops() -> None:
    slower = compare.verdict([0.90, 0.91, 0.89], higher_is_better=True)
    assert slower.regression and slower.text == "regression 0.90"
    faster = compare.verdict([1.20, 1.21, 1.19], higher_is_better=True)
    assert not faster.regression and faster.text == "no regression (better: 1.20)"
    # the same ratios are a latency improvement's mirror: a latency regression
    assert compare.verdict([1.20, 1.21, 1.19], higher_is_better=False).regression


def test_verdict_needs_enough_runs() -> None:
    v = compare.verdict([1.5, 1.6], higher_is_better=False)
    assert not v.regression and v.text == "undecided: 2 runs"


def _system(name: str, p50s: list[float], daemon_cpu: float) -> dict[str, Any]:
    runs = [
        _run(i, p, 1e6 / p, **{"client-app": 0.05, "mrpcd-A": daemon_cpu})
        for i, p in enumerate(p50s)
    ]
    case = {"case": {"key": "latency/pinned/c1x1/64B"}, "runs": runs}
    return {"name": name, "status": "ok", "cases": [case]}


def test_compare_reports_metrics_and_cpu_per_role() -> None:
    mine = _system("mrpc", [120, 121, 119], daemon_cpu=0.2)
    base = _system("mrpc@X", [100, 100, 100], daemon_cpu=0.1)
    (row,) = compare.compare(mine, base)
    p50 = row["metrics"]["p50"]
    assert p50["verdict"]["text"] == "regression 1.20"
    assert row["metrics"]["rate"]["verdict"]["regression"]
    assert row["roles"]["mrpcd-A"]["ratio"]["median"] == pytest.approx(2.0)
    assert row["roles"]["client-app"]["ratio"]["median"] == pytest.approx(1.0)
    assert row["roles"]["mrpcd-A"]["mine"]["median"] == pytest.approx(200.0)  # µs per RPC

    results = {
        "systems": {"mrpc": mine, "mrpc@X": base},
        "baseline": {"rev": "X", "commit": "f" * 40, "pairs": [["mrpc", "mrpc@X"]]},
    }
    text = "\n".join(compare.section(results))
    assert "mrpc / mrpc@X, pinned RTT p50: 1.200** [1.190–1.210]" in text
    assert "| latency/pinned/c1x1/64B | mrpcd-A |" in text
    assert compare.section({"systems": {}}) == []
