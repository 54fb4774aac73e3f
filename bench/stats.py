"""Pure statistics helpers: percentiles, run summaries, CDF sketches."""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CDF_POINTS = 400


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (``nan`` when empty)."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * n))
    return float(sorted_values[min(rank, n) - 1])


def latency_summary(lat_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/mean/max in microseconds, plus the sample count."""
    s = sorted(lat_ns)
    out: dict[str, float] = {"n": float(len(s))}
    for p in PERCENTILES:
        out[f"p{p:g}"] = percentile(s, p) / 1e3
    out["mean"] = (sum(s) / len(s) / 1e3) if s else math.nan
    out["max"] = (s[-1] / 1e3) if s else math.nan
    return out


def cdf_sketch(lat_ns: Sequence[int], points: int = CDF_POINTS) -> list[list[float]]:
    """``[[latency_us, cumulative_fraction], ...]`` at evenly spaced ranks plus the tail.

    The tail (the top 1 %) gets extra points so a log-scale CDF plot shows p99.9.
    """
    s = sorted(lat_ns)
    n = len(s)
    if n == 0:
        return []
    fracs = [i / points for i in range(1, points)]
    fracs += [0.99 + 0.01 * i / 50 for i in range(1, 50)]
    fracs = sorted(set(fracs)) + [1.0]
    out = []
    for f in fracs:
        idx = min(n - 1, max(0, math.ceil(f * n) - 1))
        out.append([s[idx] / 1e3, f])
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with min and max over runs (NaNs dropped)."""
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "runs": 0}
    n = len(vals)
    med = vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2
    return {"median": med, "min": vals[0], "max": vals[-1], "runs": n}
