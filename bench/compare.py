"""Working tree vs. a baseline revision (``--baseline REV``): per-run ratios and verdicts.

bench/paired.py measures the working tree's window and right after it the
baseline's, run by run, so run *i* of both sides saw the same machine. The ratio
of a metric is taken per run (working tree / REV) and summarized as the median
with [min–max] over runs.

Noise band: the ratios of one comparison scatter by the noise that pairing does
not cancel (other work on the host comes and goes within a second). How far the
median ratio can stray by that scatter alone is read off the ratios themselves,
without assuming a distribution: with n ratios sorted, the k-th smallest and k-th
largest bound the true median with confidence 1 - 2·P(Binomial(n, ½) < k) (the
sign test), k the largest with at least ``CONFIDENCE`` (99 %). With 8 to 11 runs
that interval is [min, max] (99.2 % with 8); with 16, the 3rd smallest to the 3rd
largest. The band is the distance from the median to the interval's end on the
"worse" side, at least ``NOISE_FLOOR``. A median worse than 1.0 by more than the
band (the whole interval worse than 1.0 -- with 8 runs, every run -- and the
median by more than the floor) is a *regression*, anything else *no regression*.

99 % rather than 90 %: a report holds ~20 verdicts, and on a shared machine the
noise comes in bursts longer than one run (runs are not independent): a run of the
same code on both sides, judged at 90 %, called 2 of 20 metrics a regression.
``--baseline`` against the checked-out commit itself shows the band this machine
gives (bench/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bench import stats

NOISE_FLOOR = 0.02  # the smallest band: a 2 % median shift is never called a regression
CONFIDENCE = 0.99  # of the median's interval (8 paired runs are the fewest that reach it)

Run = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    value: Callable[[Run], float | None]


def _lat(p: str) -> Callable[[Run], float | None]:
    return lambda r: (r.get("lat") or {}).get(p)


METRICS = (
    Metric("p50", "RTT p50", "µs", False, _lat("p50")),
    Metric("p99", "RTT p99", "µs", False, _lat("p99")),
    Metric("rate", "rate", "RPC/s", True, lambda r: r.get("rate")),
    Metric("cpu", "CPU per RPC", "µs", False, lambda r: r.get("cpu_us_per_rpc")),
)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def paired_ratios(
    mine: Iterable[Run], base: Iterable[Run], value: Callable[[Run], float | None]
) -> list[float]:
    """``value(mine run i) / value(base run i)`` for every run index both sides measured."""
    theirs = {r["run"]: r for r in base if r.get("count")}
    out: list[float] = []
    for r in mine:
        b = theirs.get(r["run"])
        if b is None or not r.get("count"):
            continue
        a_v, b_v = value(r), value(b)
        if _finite(a_v) and _finite(b_v) and b_v:
            out.append(float(a_v) / float(b_v))  # type: ignore[arg-type]
    return out


def median_interval(ratios: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free interval of the median: ``(x_(k), x_(n+1-k))`` of the sorted values,
    k the largest with coverage ``1 - 2 P(Bin(n, 1/2) < k) >= confidence``; NaNs if n is
    too small for that confidence."""
    xs = sorted(ratios)
    n = len(xs)
    best = 0
    for k in range(1, (n + 1) // 2 + 1):
        tail = sum(math.comb(n, i) for i in range(k)) / 2**n
        if 1 - 2 * tail < confidence:
            break
        best = k
    if best == 0:
        return math.nan, math.nan
    return xs[best - 1], xs[n - best]


def noise_band(
    ratios: list[float], higher_is_better: bool, floor: float = NOISE_FLOOR
) -> tuple[float, float]:
    """(band on the worse side, band on the better side) around the median ratio."""
    lo, hi = median_interval(ratios)
    if math.isnan(lo):
        return math.nan, math.nan
    med = stats.spread(ratios)["median"]
    below, above = max(floor, med - lo), max(floor, hi - med)
    return (below, above) if not higher_is_better else (above, below)


@dataclass(frozen=True)
class Verdict:
    median: float
    min: float
    max: float
    runs: int
    lo: float  # the median's interval (CONFIDENCE)
    hi: float
    band: float  # on the worse side
    regression: bool
    text: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def verdict(ratios: list[float], higher_is_better: bool, floor: float = NOISE_FLOOR) -> Verdict:
    """Whether ``ratios`` (working tree / baseline, per run) show a regression."""
    s = stats.spread(ratios)
    n = int(s["runs"])
    lo, hi = median_interval(ratios)
    band, band_better = noise_band(ratios, higher_is_better, floor)
    med = s["median"]
    if math.isnan(band):
        need = next(m for m in range(1, 100) if not math.isnan(median_interval([1.0] * m)[0]))
        text = f"undecided: {n} runs ({need} needed)"
        return Verdict(med, s["min"], s["max"], n, lo, hi, band, False, text)
    worse_by = (1.0 - med) if higher_is_better else (med - 1.0)
    if worse_by > band:
        text = f"regression {med:.2f}"
    elif -worse_by > band_better:
        text = f"no regression (better: {med:.2f})"
    else:
        text = f"no regression (within {band * 100:.1f} % noise)"
    return Verdict(med, s["min"], s["max"], n, lo, hi, band, worse_by > band, text)


def _cases(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["case"]["key"]: c for c in rec.get("cases", []) if c.get("runs")}


def compare(mine: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every case both systems measured: per metric the two medians, ratio and verdict;
    per process role the CPU µs per RPC of both and their ratio."""
    out = []
    theirs = _cases(base)
    for key, case in _cases(mine).items():
        other = theirs.get(key)
        if other is None:
            continue
        row: dict[str, Any] = {"case": key, "metrics": {}, "roles": {}}
        for m in METRICS:
            ratios = paired_ratios(case["runs"], other["runs"], m.value)
            row["metrics"][m.key] = {
                "mine": stats.spread([m.value(r) or math.nan for r in case["runs"]]),
                "base": stats.spread([m.value(r) or math.nan for r in other["runs"]]),
                "ratios": ratios,
                "verdict": verdict(ratios, m.higher_is_better).to_json(),
            }
        roles = sorted({role for r in [*case["runs"], *other["runs"]] for role in r["cpu_s"]})
        for role in roles:

            def per_rpc(r: Run, role: str = role) -> float | None:
                return r["cpu_s"].get(role, 0.0) / r["count"] * 1e6 if r.get("count") else None

            ratios = paired_ratios(case["runs"], other["runs"], per_rpc)
            row["roles"][role] = {
                "mine": stats.spread([per_rpc(r) or math.nan for r in case["runs"]]),
                "base": stats.spread([per_rpc(r) or math.nan for r in other["runs"]]),
                "ratio": stats.spread(ratios),
            }
        out.append(row)
    return out


def _ratio(s: dict[str, float]) -> str:
    if not s or not s.get("runs"):
        return "—"
    return f"**{s['median']:.3f}** <sub>[{s['min']:.3f}–{s['max']:.3f}]</sub>"


def _val(s: dict[str, float]) -> str:
    if not s or not s.get("runs"):
        return "—"
    d = 0 if abs(s["median"]) >= 100 else (1 if abs(s["median"]) >= 10 else 2)
    return f"{s['median']:,.{d}f} <sub>[{s['min']:,.{d}f}–{s['max']:,.{d}f}]</sub>"


HEADLINE = (
    ("latency/pinned/c1x1/64B", "p50", "pinned RTT p50"),
    ("latency/pinned/c1x1/64B", "p99", "pinned RTT p99"),
    ("rate/scheduled/c64x1/32B", "rate", "rate, c=64, 1 client"),
)


def section(results: dict[str, Any]) -> list[str]:
    """The markdown lines of the baseline comparison (empty without ``--baseline``)."""
    bl = results.get("baseline")
    if not bl:
        return []
    systems = results["systems"]
    out = [
        (
            f"Baseline `{bl['rev']}` = `{bl['commit'][:12]}`, checked out with `git archive` (the "
            "harness in bench/ is the working tree's on both sides). Per case, each run measured "
            "the working tree's window and right after it the baseline's (A B A B ...). *ratio*: "
            "working tree / baseline per run, median **bold** with [min–max] over runs. *noise "
            f"band*: from the median to the worse end of its {CONFIDENCE * 100:.0f} % "
            "distribution-free interval (sign test over the runs' ratios; the interval in "
            f"brackets), at least {NOISE_FLOOR * 100:.0f} %; a median worse than 1.0 by more "
            "than that is a *regression* (latency and CPU: ratio > 1; rate: ratio < 1)."
        ),
        "",
    ]
    for label, files in bl.get("imports", {}).items():
        where = files.get("error") or ", ".join(f"`{k}` from `{v}`" for k, v in files.items())
        out.append(f"- imports, {label}: {where}")
    out.append("")
    for mine_name, base_name in bl.get("pairs", []):
        mine, base = systems.get(mine_name), systems.get(base_name)
        if not mine or not base:
            continue
        if base.get("status") in ("skipped", "failed"):
            out += [f"**{base_name}** {base['status']}: {base.get('reason', '')}", ""]
            continue
        rows = compare(mine, base)
        by_case = {r["case"]: r for r in rows}
        load = [_foreign(rec) for rec in (mine, base)]
        if all(x is not None for x in load):
            out += [
                (
                    f"Other processes on the host used {load[0]:.0f} % of a CPU during {mine_name}'s "
                    f"windows, {load[1]:.0f} % during {base_name}'s (mean over windows)."
                ),
                "",
            ]
        for case_key, metric, label in HEADLINE:
            row = by_case.get(case_key)
            if row:
                m = row["metrics"][metric]
                v = m["verdict"]
                out.append(
                    f"- **{mine_name} / {base_name}, {label}: {v['median']:.3f}** "
                    f"[{v['min']:.3f}–{v['max']:.3f}] over {v['runs']} runs "
                    f"({_val(m['mine'])} vs {_val(m['base'])}): {v['text']}"
                )
        out += [
            "",
            (
                f"| {mine_name} / {base_name} | metric | working tree | baseline | ratio | "
                "noise band | verdict |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            for m in METRICS:
                x = row["metrics"][m.key]
                v = x["verdict"]
                band = (
                    "—"
                    if _nan(v["band"])
                    else f"{v['band'] * 100:.1f} % <sub>[{v['lo']:.3f}–{v['hi']:.3f}]</sub>"
                )
                ratio = {"median": v["median"], "min": v["min"], "max": v["max"], "runs": v["runs"]}
                out.append(
                    f"| {row['case']} | {m.label} ({m.unit}) | {_val(x['mine'])} | "
                    f"{_val(x['base'])} | {_ratio(ratio)} | {band} | {v['text']} |"
                )
        out += [
            "",
            (
                "CPU µs per RPC by process (user+sys of each process over the window ÷ RPCs; "
                "`client-app`: all client processes):"
            ),
            "",
            f"| {mine_name} / {base_name} | process | working tree | baseline | ratio |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            for role, x in row["roles"].items():
                out.append(
                    f"| {row['case']} | {role} | {_val(x['mine'])} | {_val(x['base'])} | "
                    f"{_ratio(x['ratio'])} |"
                )
        out.append("")
    return out


def _foreign(rec: dict[str, Any]) -> float | None:
    """Mean % of a CPU other processes used during ``rec``'s measured windows."""
    runs = [r for c in rec.get("cases", []) for r in c.get("runs", [])]
    busy = sum(r.get("foreign_cpu_s", 0.0) for r in runs)
    wall = sum(r.get("wall_s", 0.0) for r in runs)
    return busy / wall * 100 if wall > 0 else None


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
