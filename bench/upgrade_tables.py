"""Cells and the comparison tables of the live-upgrade report (bench/upgrade_report.py):
mrpc next to Envoy for the same operator action, and the GC probe's pauses."""

from __future__ import annotations

import math
from typing import Any


def cell(s: dict[str, Any], fmt: str = "{:,.1f}") -> str:
    if not s or not s.get("runs") or math.isnan(s["median"]):
        return "—"
    if s["runs"] == 1:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} <sub>[{fmt.format(s['min'])}–{fmt.format(s['max'])}]</sub>"


def pair(a: dict[str, Any], b: dict[str, Any], fmt: str = "{:,.0f}") -> str:
    return f"{cell(a, fmt)} → {cell(b, fmt)}"


def failed_cell(sm: dict[str, Any]) -> str:
    codes = sm.get("codes") or {}
    by_code = f" ({', '.join(f'{c} {n:,}' for c, n in sorted(codes.items()))})" if codes else ""
    return f"{sm['failed']:,}{by_code}"


def ratio_cell(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Median of ``a`` over median of ``b``."""
    if not a.get("runs") or not b.get("runs") or not b["median"]:
        return "—"
    return f"{a['median'] / b['median']:.2f}"


# (operator action, the mrpc scenario, the peer scenario)
SIDE_BY_SIDE = (
    (
        "restart the process under live connections (hot restart)",
        "daemon-restart",
        "envoy-hot-restart",
    ),
    (
        "change a policy without a restart, each its own way (mrpc: engine upgrade; Envoy: LDS)",
        "ratelimit",
        "envoy-policy",
    ),
    (
        "restart the process; Envoy without hot restart (stop + start)",
        "daemon-restart",
        "envoy-restart",
    ),
)


def side_by_side(results: dict[str, Any]) -> list[str]:
    """The mrpc rows next to the peer rows doing the same operator action (if both ran)."""
    scs = results["scenarios"]
    rows = [(what, scs[m], scs[e], m, e) for what, m, e in SIDE_BY_SIDE if m in scs and e in scs]
    if not rows:
        return []
    lines = [
        "",
        "## mrpc vs Envoy, the same operator action, same load, same run",
        "",
        (
            "Medians [min–max] over runs; ratios: Envoy's median over mrpc's. *stall / gap "
            "before*: the run's stall over the longest gap of its own before window (per run, "
            "median): how much the action adds to what each stack's load already shows; "
            "*p99 during / before*: the same for p99 latency. *failed*: calls that raised, "
            "by gRPC status; *unanswered*: executed by the server, reply lost; *reconnects*: "
            "times the client's channel became READY again (mrpc: not applicable, the app's "
            "rings never move)."
        ),
        "",
        (
            "| operator action | stack: scenario | stall ms | longest gap before ms | stall / gap "
            "before | p99 µs before → during | p99 during / before | RPC/s before | failed / "
            "unanswered | reconnects |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for what, m, e, mname, ename in rows:
        for stack, sc, name in (("mrpc", m, mname), ("Envoy", e, ename)):
            sm = sc["summary"]
            lines.append(
                f"| {what} | {stack}: {name} | {cell(sm['stall_ms'])} | "
                f"{cell(sm['gap_before_ms'])} | {cell(sm.get('stall_over_gap_before', {}), '{:.2f}')} | "
                f"{pair(sm['p99_before_us'], sm['p99_during_us'])} | "
                f"{cell(sm.get('p99_during_over_before', {}), '{:.2f}')} | "
                f"{cell(sm['rate_before'], '{:,.0f}')} | {failed_cell(sm)} / {sm['unanswered']:,} | "
                f"{sm.get('reconnects', 0) if sc.get('peer') else '—'} |"
            )
        ms, es = m["summary"], e["summary"]
        lines.append(
            f"| {what} | **Envoy / mrpc** | {ratio_cell(es['stall_ms'], ms['stall_ms'])} | "
            f"{ratio_cell(es['gap_before_ms'], ms['gap_before_ms'])} | "
            f"{ratio_cell(es.get('stall_over_gap_before', {}), ms.get('stall_over_gap_before', {}))} | | "
            f"{ratio_cell(es.get('p99_during_over_before', {}), ms.get('p99_during_over_before', {}))} | "
            f"{ratio_cell(es['rate_before'], ms['rate_before'])} | "
            f"{es['failed']:,} vs {ms['failed']:,} | |"
        )
    lines += [
        "",
        (
            "Not measured: Istio's ztunnel (the per-node proxy of Istio's ambient mode, whose "
            "upgrade restarts the one proxy every workload of the node goes through) needs "
            "Kubernetes and Istio's CNI; this host has neither, so no ztunnel figure is given."
        ),
    ]
    return lines


def gc_cell(sm: dict[str, Any]) -> str:
    if not sm.get("gc_probed"):
        return "—"
    return f"{sm['stall_gc_runs']}/{sm['gc_probed']} · {sm['gap_before_gc_runs']}/{sm['gc_probed']}"


def gc_section(results: dict[str, Any]) -> list[str]:
    """Where the gaps come from: the full collections each process made during the load."""
    rows = []
    for name, sc in results["scenarios"].items():
        for role, g in sc["summary"].get("full_gc", {}).items():
            rows.append(
                f"| {name} | {role} | {g['count']} | {g['per_s']:.2f} | "
                f"{g['median']:.1f} | {g['max']:.1f} |"
            )
    if not results.get("gc_probe"):
        return []
    return [
        "",
        "## Garbage collection pauses (the GC probe)",
        "",
        (
            "Every Python process of a run logs its collections (`bench/gcprobe`: a "
            "`gc.callbacks` entry, two clock reads per collection). *GC at stall · before* in "
            "the table above: in how many runs the stall, and the longest gap before, was a "
            "collection's (collections of ≥ 1 ms in any process cover at least a third of it; "
            "which ones: `results.json`, `analysis.gc_at_stall`). *clear of GC*: the same two "
            "figures taken only over the gaps that are not a collection's: what is left once "
            "the pauses are set aside. Full (generation-2) collections during the load:"
        ),
        "",
        "| scenario | process | full collections | per s of load | ms median | ms max |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
