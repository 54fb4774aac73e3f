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


def test_median_interval_uses_order_statistics_with_the_sign_test_coverage() -> None:
    seven = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]
    assert all(math.isnan(x) for x in compare.median_interval(seven))  # min..max: 98.4 %
    eight = [0.8, 0.9, 0.95, 1.0, 1.02, 1.04, 1.1, 1.5]
    assert compare.median_interval(eight) == (0.8, 1.5)  # min..max: 99.2 %
    sixteen = [float(i) for i in range(16)]
    assert compare.median_interval(sixteen) == (2.0, 13.0)  # 3rd..14th: 99.6 %; 4th: 97.9 %
    # at 90 %: five runs suffice, and ten give the 2nd..9th
    assert compare.median_interval([1.05, 0.90, 1.20, 1.00, 1.10], 0.90) == (0.90, 1.20)
    assert compare.median_interval([float(i) for i in range(10)], 0.90) == (1.0, 8.0)


def test_noise_band_is_the_distance_to_the_interval_on_the_worse_side() -> None:
    eight = [0.90, 0.95, 1.00, 1.04, 1.06, 1.10, 1.15, 1.20]  # median 1.05, [0.90, 1.20]
    assert compare.noise_band(eight, higher_is_better=False) == pytest.approx((0.15, 0.15))
    skew = [0.99, 1.00, 1.00, 1.01, 1.01, 1.02, 1.02, 1.40]  # median 1.01
    worse, better = compare.noise_band(skew, higher_is_better=False)
    assert (worse, better) == pytest.approx((compare.NOISE_FLOOR, 0.39))  # floor 2 %
    assert compare.noise_band(skew, higher_is_better=True) == pytest.approx((0.39, 0.02))


def test_verdict_flags_a_latency_regression_when_every_run_is_worse() -> None:
    v = compare.verdict([1.10, 1.12, 1.11, 1.13, 1.12, 1.11, 1.12, 1.14], higher_is_better=False)
    assert v.regression
    assert v.text == "regression 1.12"
    assert v.band == pytest.approx(0.02)  # floor: median - min = 0.02
    assert (v.min, v.max, v.runs, v.lo, v.hi) == (1.10, 1.14, 8, 1.10, 1.14)


def test_verdict_within_the_band_is_no_regression() -> None:
    # median 1.05, but one run was better than the baseline: not all worse
    v = compare.verdict([0.98, 1.15, 1.08, 1.03, 1.05, 1.05, 1.06, 1.04], higher_is_better=False)
    assert not v.regression
    assert v.band == pytest.approx(0.07)
    assert v.text == "no regression (within 7.0 % noise)"


def test_verdict_for_rate_regresses_when_the_ratio_drops() -> None:
    lower = [0.90, 0.91, 0.89, 0.92, 0.90, 0.91, 0.89, 0.90]
    slower = compare.verdict(lower, higher_is_better=True)
    assert slower.regression and slower.text == "regression 0.90"
    higher = [1.20, 1.21, 1.19, 1.22, 1.18, 1.20, 1.21, 1.19]
    faster = compare.verdict(higher, higher_is_better=True)
    assert not faster.regression and faster.text == "no regression (better: 1.20)"
    assert compare.verdict(higher, higher_is_better=False).regression  # as latency: worse


def test_a_consistent_shift_below_the_floor_is_not_a_regression() -> None:
    v = compare.verdict([1.010, 1.012, 1.011, 1.013, 1.012, 1.01, 1.01, 1.01], False)
    assert not v.regression and v.text == "no regression (within 2.0 % noise)"


def test_verdict_needs_enough_runs() -> None:
    v = compare.verdict([1.5, 1.6, 1.7, 1.8, 1.5, 1.6, 1.7], higher_is_better=False)
    assert not v.regression and v.text == "undecided: 7 runs (8 needed)"


def _system(name: str, p50s: list[float], daemon_cpu: float) -> dict[str, Any]:
    runs = [
        _run(i, p, 1e6 / p, **{"client-app": 0.05, "mrpcd-A": daemon_cpu})
        for i, p in enumerate(p50s)
    ]
    case = {"case": {"key": "latency/pinned/c1x1/64B"}, "runs": runs}
    return {"name": name, "status": "ok", "cases": [case]}


def test_compare_reports_metrics_and_cpu_per_role() -> None:
    mine = _system("mrpc", [120, 121, 119, 120, 120, 120, 120, 120], daemon_cpu=0.2)
    base = _system("mrpc@X", [100] * 8, daemon_cpu=0.1)
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
