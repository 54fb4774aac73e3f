"""results.md and the plots of ``python -m bench upgrade`` (also ``python -m bench report``).

One PNG per scenario, drawn from the run whose stall is the median of its runs:
completions per 5-ms bin over the whole run with the command's interval shaded
(like the live-upgrade figure of the mRPC paper), a 1-ms-bin zoom on the
longest pause of the upgrade window, and every call's latency over time.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from bench.upgrade_apps import read_calls
from bench.upgrade_tables import cell, failed_cell, gc_cell, gc_section, pair, side_by_side

NS = 1e9


def _swap_cell(sm: dict[str, Any]) -> str:
    at, slot = sm.get("gap_at_swap_ms"), sm.get("slot_gap_before_p90_ms")
    if not at or not at["runs"]:
        return "—"
    held = sm.get("swap_runtime_ms")
    own = f"<br>runtime held by the swap: {cell(held, '{:.2f}')}" if held and held["runs"] else ""
    return f"{cell(at)}<br>55-ms slots before, p90: {cell(slot)}{own}"


GC_VARIANTS = {
    "no-full": (
        "the daemons ran without automatic full (generation-2) garbage collections "
        "(`gc.set_threshold(700, 10, 10**9)`)"
    ),
    "freeze": (
        "each daemon called `gc.freeze()` at the end of its first full collection (start-up "
        "objects moved to the permanent generation, no longer scanned)"
    ),
}


def _control(sc: dict[str, Any]) -> str:
    """The control cell: which command ran (results before `list` had ``control: true``)."""
    command = sc["control"] if isinstance(sc["control"], str) else "status"
    return f"no upgrade: {command}"


def _load(host: dict[str, Any]) -> str:
    a, b = host.get("loadavg_start"), host.get("loadavg_end")
    if not a or not b:
        return ""
    return f", host load average (1 min) {a[0]:.1f} at the start, {b[0]:.1f} at the end"


def verdict(sm: dict[str, Any]) -> str:
    if not sm["completed"]:
        return "**no completed run**"
    goal, stall = sm["goal_ms"], sm["stall_ms"]["median"]
    parts = [
        (
            f"stall {'**met**' if stall <= goal else '**missed**'} "
            f"({sm['met']}/{sm['completed']} runs ≤ {goal:g} ms)"
        )
    ]
    if stall > goal and sm["gap_before_ms"]["median"] >= goal:
        parts.append(
            f"unresolvable here: without an upgrade the longest gap was already "
            f"{sm['gap_before_ms']['median']:.1f} ms"
        )
    held = sm.get("swap_runtime_ms")
    if held and held["runs"]:
        ok = held["max"] <= goal
        parts.append(
            f"the swap itself held the runtime {held['median']:.2f} ms (max {held['max']:.2f}): "
            f"{'**met**' if ok else '**missed**'}"
        )
    bad = sm["failed"] + sm["mismatched"] + sm["duplicates"] + sm["unanswered"]
    parts.append("0 failed calls **met**" if bad == 0 else f"failed calls **missed** ({bad})")
    return "; ".join(parts)


def markdown(results: dict[str, Any], plots: list[str] | tuple[str, ...] = ()) -> str:
    """The report; ``plots``: file names of the PNGs to show."""
    plan, host = results["plan"], results["host"]
    variant = plan.get("daemon_gc", "default")
    lines = [
        "# Live upgrade under load",
        "",
        *(
            [
                (
                    f"**DIAGNOSTIC VARIANT `--daemon-gc {variant}`: "
                    f"{GC_VARIANTS.get(variant, '')}; set by the bench's GC probe "
                    "(`bench/gcprobe`), mrpcd does not ship this way. It shows the load, and "
                    "the upgrades, without the daemons' full-collection pauses.**"
                ),
                "",
            ]
            if variant != "default"
            else []
        ),
        *(
            [
                (
                    "**VARIANT `--rt`: every thread of the apps, the daemons and the Envoys ran "
                    "SCHED_RR priority 10 (`chrt -r 10`): the host's other processes could not "
                    "preempt them; they still share the 2 CPUs with each other and `mrpcctl` "
                    "(normal priority). When they saturate a CPU the kernel's RT throttling "
                    "(`sched_rt_runtime_us` 950000 of 1000000) stops them for up to 50 ms: "
                    "pauses of 50–60 ms in this variant can be that.**"
                ),
                "",
            ]
            if plan.get("rt")
            else []
        ),
        *(
            [
                (
                    "**VARIANT `--nice`: every thread of the apps, the daemons and the Envoys "
                    "ran at nice -20: the host's other processes got ~1/87 of their CPU share; "
                    "they still share the 2 CPUs with each other and `mrpcctl` (nice 0).**"
                ),
                "",
            ]
            if plan.get("nice")
            else []
        ),
        (
            f"{results['conc']} calls in flight (client app on daemon A, echo server app on "
            f"daemon B, 32-byte payloads of their own; the envoy-* rows: grpc.aio client -> "
            f"Envoy A -> Envoy B -> grpc.aio server, the same load), {plan['phase_s']:g} s steady, the command, "
            f"{plan['phase_s']:g} s more; {plan['runs']} run(s) per scenario, scenarios alternating, "
            f"fresh daemons every run; {'every process on CPU 0' if plan['pinned'] else 'scheduled'}"
            f"{' (SCHED_RR 10)' if plan.get('rt') else ''}{' (nice -20)' if plan.get('nice') else ''}"
            f" on {host['cpus']} CPUs, Python {host['python']}"
            f"{_load(host)}. Medians with [min–max] over runs. "
            "*control* runs `mrpcctl list` instead of an upgrade: compare every row with it."
        ),
        "",
        (
            "| scenario | goal | stall ms | longest gap before ms | longest gap at the swap ms | "
            "p50 µs before → during | p99 µs before → during | RPC/s before → during | "
            "command s | calls | failed / mismatched / duplicated / unanswered | "
            "GC at stall · before | clear of GC ms: stall · before | verdict |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sc in results["scenarios"].items():
        sm = sc["summary"]
        lines.append(
            f"| {name} | ≤ {sm['goal_ms']:g} ms | {cell(sm['stall_ms'])} | "
            f"{cell(sm['gap_before_ms'])} | {_swap_cell(sm)} | "
            f"{pair(sm['p50_before_us'], sm['p50_during_us'])} | "
            f"{pair(sm['p99_before_us'], sm['p99_during_us'])} | "
            f"{pair(sm['rate_before'], sm['rate_during'])} | "
            f"{cell(sm['command_s'], '{:.2f}')} | {sm['calls']:,} | "
            f"{failed_cell(sm)} / {sm['mismatched']} / {sm['duplicates']} / {sm['unanswered']} | "
            f"{gc_cell(sm)} | {cell(sm.get('stall_clear_of_gc_ms', {}))} · "
            f"{cell(sm.get('gap_before_clear_of_gc_ms', {}))} | {_control(sc) if sc.get('control') else verdict(sm)} |"
        )
    lines += side_by_side(results)
    lines += gc_section(results)
    for name, why in results.get("skipped", {}).items():
        lines.append(f"\n*{name}*: {why} (skipped).")
    errors = [
        f"- {r['scenario']} run {r['run']}: {r['error']}"
        for sc in results["scenarios"].values()
        for r in sc["runs"]
        if "error" in r
    ]
    if errors:
        lines += ["", "Failed runs:", *errors]
    tb = sum(r.get("tracebacks", 0) for sc in results["scenarios"].values() for r in sc["runs"])
    lines += ["", f"Tracebacks in the logs of every process: {tb}."]
    lines += ["", "What the scenarios do:", ""]
    lines += [f"- *{n}*: {sc['what']}" for n, sc in results["scenarios"].items()]
    lines += [
        "",
        "How to read it:",
        "",
        (
            f"- *upgrade window*: from {results['margin_s']:g} s before `mrpcctl` started to "
            f"{results['margin_s']:g} s after it returned; *stall* is the longest interval between "
            "two consecutive completions that overlaps it; *longest gap before* is the same over "
            "an equally long window right before it (cut to after a 0.3 s warm-up): what "
            "scheduling alone does to this load on this host. A stall is only attributable to "
            "the upgrade where it clearly exceeds that."
        ),
        (
            "- *longest gap at the swap*: engine upgrades only: the longest interval between completions "
            "overlapping 50 ms before to 5 ms after daemon A logged `upgraded ... from vN to "
            "vN+1` (its log has ms resolution and is written right after the swap), next to "
            "the p90, over the 55-ms slots of the before window, of each slot's longest gap: "
            "the same figure without a swap."
        ),
        (
            "- *runtime held by the swap*: the time the datapath's runtime spent in the "
            "swap (decompose, check, restore, resume), as the daemon reports it in the "
            "command's answer (`engines[].ms`): no call of that runtime moved meanwhile; "
            "the rest of the stall is the host's scheduling."
        ),
        "- *command s*: wall time of the `mrpcctl` process, Python start-up (~0.2 s) included.",
        (
            "- latency before/during: calls that completed in the before window / the upgrade "
            "window. *calls*: answered calls over all runs; *failed*: calls that raised; "
            "*mismatched*: replies whose payload was not the request's; *duplicated*: requests "
            "the server app executed twice; *unanswered*: executed but never answered."
        ),
        (
            "- Shared 2-vCPU VM: four Python processes (two daemons, two apps) plus `mrpcctl` "
            "share 2 CPUs with whatever else runs; pauses of tens of ms from preemption happen "
            "with or without an upgrade, which is why the before window is reported next to "
            "every stall."
        ),
    ]
    lines += [x for p in plots for x in ("", f"![{p}]({p})")]
    return "\n".join(lines) + "\n"


def representative(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed run whose stall is the median (lower median for an even count)."""
    ok = sorted((r for r in runs if "analysis" in r), key=lambda r: r["analysis"]["stall_ms"])
    return ok[(len(ok) - 1) // 2] if ok else None


def plot(name: str, sc: dict[str, Any], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rec = representative(sc["runs"])
    if rec is None:
        return None
    done, lat = read_calls(out / rec["calls_file"])
    t = (np.frombuffer(done, dtype=np.int64) - rec["started_ns"]) / NS
    lat_ms = np.frombuffer(lat, dtype=np.int64) / 1e6
    a, cmd = rec["analysis"], rec["command"]
    c0, c1 = ((cmd["start_ns"] - rec["started_ns"]) / NS, (cmd["end_ns"] - rec["started_ns"]) / NS)
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9))

    client = rec.get("client", {})
    failing = None
    if client.get("failed") and client.get("error_ns"):
        failing = (
            (client["error_ns"][0] - rec["started_ns"]) / NS,
            (client.get("last_error_ns") or client["error_ns"][-1]) - rec["started_ns"],
        )
        failing = (failing[0], failing[1] / NS)

    def mark(ax: Any) -> None:
        ax.axvspan(c0, c1, color="tab:orange", alpha=0.25, label="command running")
        if failing:
            ax.axvspan(*failing, ymin=0.9, color="black", alpha=0.5, label="calls failing")
        if "swap_at_s" in a:
            ax.axvline(a["swap_at_s"], color="tab:red", lw=1, ls="--", label="swap logged")

    edges = np.arange(0.0, t.max() + 0.005, 0.005)
    counts, _ = np.histogram(t, bins=edges)
    ax1.step(edges[:-1], counts, where="post", lw=0.7)
    mark(ax1)
    ax1.axvspan(*a["window_s"], color="grey", alpha=0.08, label="upgrade window")
    ax1.set(xlabel="time since load start (s)", ylabel="completions per 5 ms")
    ax1.set_title(f"{name}: run {rec['run']} (median stall {a['stall_ms']:.1f} ms)")
    ax1.legend(loc="lower left", fontsize=8)

    if "swap_at_s" in a:  # engine upgrades: zoom on the swap and the longest gap there
        g_at, g_ms, what = a["gap_at_swap_at_s"], a["gap_at_swap_ms"], "around the swap"
        lo, hi = a["swap_at_s"] - 0.1, a["swap_at_s"] + 0.05
    else:
        g_at, g_ms, what = a["stall_at_s"], a["stall_ms"], "the longest pause in the window"
        mid = g_at + g_ms / 2e3
        half = max(0.1, g_ms / 2e3 + 0.05)  # a long outage whole, with 50 ms either side
        lo, hi = mid - half, mid + half
    edges = np.arange(lo, hi + 0.001, 0.001)
    counts, _ = np.histogram(t, bins=edges)
    ax2.bar(edges[:-1], counts, width=0.001, align="edge")
    mark(ax2)
    ax2.axvspan(g_at, g_at + g_ms / 1e3, color="tab:red", alpha=0.15, label="longest gap")
    gcs = [p for p in rec.get("gc", []) if p["at_s"] < hi and p["at_s"] + p["ms"] / 1e3 > lo]
    for k, p in enumerate(gcs):
        ax2.axvspan(
            p["at_s"], p["at_s"] + p["ms"] / 1e3, ymax=0.1, color="tab:purple", alpha=0.6,
            label="GC pause (any process)" if k == 0 else None,
        )  # fmt: skip
        ax2.annotate(
            f"{p['role']} gen{p['generation']} {p['ms']:.1f} ms", (p["at_s"], 0),
            xytext=(0, 12 + 10 * (k % 3)), textcoords="offset points", fontsize=7,
            color="tab:purple",
        )  # fmt: skip
    ax2.set(xlabel="time (s)", ylabel="completions per 1 ms")
    ax2.set_title(f"zoom, 1-ms bins: {what} (longest gap {g_ms:.1f} ms)")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.set_xlim(lo, hi)

    ax3.scatter(t, lat_ms, s=1, alpha=0.4, rasterized=True)
    mark(ax3)
    ax3.set_yscale("log")
    ax3.set(xlabel="completion time since load start (s)", ylabel="latency (ms)")
    fig.tight_layout()
    path = out / f"upgrade_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json, the plots (if matplotlib is installed) and results.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    written[0].write_text(json.dumps(results, indent=1, default=str))
    if importlib.util.find_spec("matplotlib") is not None:
        for name, sc in results["scenarios"].items():
            p = plot(name, sc, out)
            if p is not None:
                written.append(p)
    md = out / "results.md"
    md.write_text(markdown(results, [p.name for p in written[1:]]))
    written.append(md)
    return written
