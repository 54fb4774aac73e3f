"""Turn ``results.json`` into ``results.md`` and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import compare, stats
from bench.plan import GOODPUT_TARGET_SIZE, LATENCY_REQ, RATE_REQ, RATE_TARGET_CONC, REPLY_SIZE

COLORS = {
    "mrpc": "tab:red",
    "mrpc-null": "tab:orange",
    "mrpc-ratelimit": "tab:olive",
    "mrpc-acl": "tab:brown",
    "grpc-sync": "tab:blue",
    "grpc-aio": "tab:cyan",
    "grpc-envoy": "tab:purple",
    "tcp-floor": "tab:gray",
    "shm-floor": "tab:green",
    "socket-stream": "black",
}


@dataclass(frozen=True)
class Target:
    text: str
    peer: str
    workload: str
    mode: str
    conc: int
    size: int
    metric: str  # a key of a case summary: p50, p99, rate, goodput_Bps, cpu_us_per_rpc
    op: str  # "<=" or ">="
    bound: float


TARGETS = (
    Target(
        "RTT p50 (pinned): mrpc ≤ 0.2 × grpc-sync",
        "grpc-sync",
        "latency",
        "pinned",
        1,
        LATENCY_REQ,
        "p50",
        "<=",
        0.2,
    ),
    Target(
        "RTT p50 (pinned): mrpc ≤ 0.1 × grpc-envoy",
        "grpc-envoy",
        "latency",
        "pinned",
        1,
        LATENCY_REQ,
        "p50",
        "<=",
        0.1,
    ),
    Target(
        "RTT p99 (pinned): mrpc ≤ 0.25 × grpc-sync",
        "grpc-sync",
        "latency",
        "pinned",
        1,
        LATENCY_REQ,
        "p99",
        "<=",
        0.25,
    ),
    Target(
        f"rate at concurrency {RATE_TARGET_CONC}: mrpc ≥ 10 × grpc-aio",
        "grpc-aio",
        "rate",
        "scheduled",
        RATE_TARGET_CONC,
        RATE_REQ,
        "rate",
        ">=",
        10.0,
    ),
    Target(
        "8 MiB goodput: mrpc ≥ 3 × grpc-sync",
        "grpc-sync",
        "goodput",
        "scheduled",
        1,
        GOODPUT_TARGET_SIZE,
        "goodput_Bps",
        ">=",
        3.0,
    ),
    Target(
        "8 MiB goodput: mrpc ≥ 60 % of a Python socket stream",
        "socket-stream",
        "goodput",
        "scheduled",
        1,
        GOODPUT_TARGET_SIZE,
        "goodput_Bps",
        ">=",
        0.6,
    ),
    Target(
        f"CPU per small RPC (rate, c={RATE_TARGET_CONC}): mrpc ≤ 0.15 × grpc-sync",
        "grpc-sync",
        "rate",
        "scheduled",
        RATE_TARGET_CONC,
        RATE_REQ,
        "cpu_us_per_rpc",
        "<=",
        0.15,
    ),
)


# ----------------------------------------------------------------------------- lookups


def find_case(
    sysrec: dict[str, Any] | None, workload: str, mode: str, conc: int, clients: int, size: int
) -> dict[str, Any] | None:
    if not sysrec:
        return None
    for c in sysrec.get("cases", []):
        k = c["case"]
        if (k["workload"], k["mode"], k["conc"], k["clients"], k["req_size"]) == (
            workload,
            mode,
            conc,
            clients,
            size,
        ):
            return c
    return None


def metric(case: dict[str, Any] | None, key: str) -> dict[str, float] | None:
    if case is None or "error" in case:
        return None
    m = case.get("summary", {}).get(key)
    if not m or m.get("runs", 0) == 0 or _nan(m["median"]):
        return None
    return m


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(m: dict[str, float] | None, scale: float = 1.0, digits: int = 0) -> str:
    if m is None:
        return "—"
    f = f"{{:,.{digits}f}}"
    return (
        f"{f.format(m['median'] * scale)} "
        f"<sub>[{f.format(m['min'] * scale)}–{f.format(m['max'] * scale)}]</sub>"
    )


def _digits(v: float) -> int:
    return 0 if v >= 100 else (1 if v >= 10 else 2)


def fmt_auto(m: dict[str, float] | None, scale: float = 1.0) -> str:
    if m is None:
        return "—"
    return fmt(m, scale, _digits(abs(m["median"] * scale)))


def size_label(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n // (1024 * 1024)} MiB"
    if n >= 1024:
        return f"{n // 1024} KiB"
    return f"{n} B"


# ----------------------------------------------------------------------------- markdown


def status_line(name: str, rec: dict[str, Any]) -> str | None:
    st = rec.get("status")
    if st == "skipped":
        return f"- **{name}** skipped: {rec.get('reason')}"
    if st == "failed":
        return f"- **{name}** failed: {rec.get('reason')} (see `logs/{name}/`)"
    bad = [c for c in rec.get("cases", []) if "error" in c]
    restarts = rec.get("restarts", [])
    if restarts:
        prefix = f"- **{name}** was restarted: {'; '.join(restarts)}"
        rest = status_line(name, {k: v for k, v in rec.items() if k != "restarts"})
        return prefix + (f"\n{rest}" if rest else "")
    if bad:
        first = bad[0]["error"].strip().splitlines()
        gave_up = f"; {rec['gave_up']}, the rest was not run" if rec.get("gave_up") else ""
        return (
            f"- **{name}**: {len(bad)} case(s) failed, first `{bad[0]['case']['key']}`: "
            f"{first[-1][:200] if first else ''}{gave_up}"
        )
    errs = sum(c.get("summary", {}).get("errors", 0) for c in rec.get("cases", []))
    if errs:
        return f"- **{name}**: {errs} calls failed during measurement (see results.json)"
    return None


def foreign_load(results: dict[str, Any]) -> tuple[float, float, str] | None:
    """(mean, worst, worst case key) of CPUs used by processes outside the case."""
    total_f = total_w = 0.0
    worst, worst_key = 0.0, ""
    for name, rec in results["systems"].items():
        for c in rec.get("cases", []):
            for r in c.get("runs", []):
                f, w = r.get("foreign_cpu_s"), r.get("wall_s")
                if f is None or not w or _nan(f):
                    continue
                total_f += f
                total_w += w
                if f / w > worst:
                    worst, worst_key = f / w, f"{name} {c['case']['key']}"
    return (total_f / total_w, worst, worst_key) if total_w else None


def targets_table(results: dict[str, Any]) -> list[str]:
    systems = results["systems"]
    mrpc = systems.get("mrpc")
    lines = [
        "| target | mrpc | peer | mrpc / peer | goal | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for t in TARGETS:
        peer = systems.get(t.peer)
        mine = metric(find_case(mrpc, t.workload, t.mode, t.conc, 1, t.size), t.metric)
        theirs = metric(find_case(peer, t.workload, t.mode, t.conc, 1, t.size), t.metric)
        unit_scale, unit = _unit(t.metric)
        a = f"{fmt_auto(mine, unit_scale)} {unit}" if mine else "—"
        b = f"{fmt_auto(theirs, unit_scale)} {unit}" if theirs else "—"
        if mine and theirs and theirs["median"] > 0:
            ratio = mine["median"] / theirs["median"]
            ok = ratio <= t.bound if t.op == "<=" else ratio >= t.bound
            verdict = "**met**" if ok else "**missed**"
            r = f"{ratio:.3g}"
        else:
            missing = []
            if not mine:
                missing.append(_why("mrpc", mrpc))
            if not theirs:
                missing.append(_why(t.peer, peer))
            verdict, r = "n/a (" + "; ".join(missing) + ")", "—"
        op = "≤" if t.op == "<=" else "≥"
        lines.append(f"| {t.text} | {a} | {t.peer}: {b} | {r} | {op} {t.bound:g} | {verdict} |")
    return lines


def _why(name: str, rec: dict[str, Any] | None) -> str:
    if rec is None:
        return f"{name} not in this run"
    if rec.get("status") in ("skipped", "failed"):
        return f"{name} {rec['status']}"
    return f"{name}: no data"


def _unit(key: str) -> tuple[float, str]:
    return {
        "p50": (1, "µs"),
        "p99": (1, "µs"),
        "p99.9": (1, "µs"),
        "rate": (1, "RPC/s"),
        "goodput_Bps": (1e-6, "MB/s"),
        "cpu_us_per_rpc": (1, "µs"),
    }[key]


def latency_table(results: dict[str, Any], mode: str) -> list[str]:
    lines = [
        "| system | p50 µs | p99 µs | p99.9 µs | CPU µs/RPC (all processes) | calls/run |",
        "|---|---|---|---|---|---|",
    ]
    for name, rec in results["systems"].items():
        c = find_case(rec, "latency", mode, 1, 1, LATENCY_REQ)
        if c is None:
            continue
        if "error" in c:
            lines.append(f"| {name} | error | | | | |")
            continue
        s = c["summary"]
        n = [r["count"] for r in c["runs"]]
        lines.append(
            f"| {name} | {fmt_auto(metric(c, 'p50'))} | {fmt_auto(metric(c, 'p99'))} | "
            f"{fmt_auto(metric(c, 'p99.9'))} | {fmt_auto(metric(c, 'cpu_us_per_rpc'))} | "
            f"{min(n) if n else 0:,}–{max(n) if n else 0:,} |"
            if s.get("runs")
            else f"| {name} | no data | | | | |"
        )
    return lines


def _concs(results: dict[str, Any]) -> list[int]:
    plan = results["plan"]
    return sorted(set(plan["rate_concs"]) | set(plan["rate_two_client_concs"]))


def rate_table(results: dict[str, Any], key: str, scale: float = 1.0) -> list[str]:
    concs = _concs(results)
    lines = [
        "| system | client procs | " + " | ".join(f"c={c}" for c in concs) + " |",
        "|---|---|" + "---|" * len(concs),
    ]
    for name, rec in results["systems"].items():
        for clients in (1, 2):
            cells = []
            any_case = False
            for c in concs:
                case = find_case(rec, "rate", "scheduled", c, clients, RATE_REQ)
                any_case |= case is not None
                cells.append(
                    "error" if case and "error" in case else fmt_auto(metric(case, key), scale)
                )
            if any_case:
                lines.append(f"| {name} | {clients} | " + " | ".join(cells) + " |")
    return lines


def goodput_table(results: dict[str, Any]) -> list[str]:
    sizes = results["plan"]["goodput_sizes"]
    lines = [
        "| system | "
        + " | ".join(size_label(s) for s in sizes)
        + " | CPU µs/RPC at "
        + size_label(sizes[-1])
        + " |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for name, rec in results["systems"].items():
        cells, any_case = [], False
        for s in sizes:
            case = find_case(rec, "goodput", "scheduled", 1, 1, s)
            any_case |= case is not None
            cells.append(
                "error" if case and "error" in case else fmt_auto(metric(case, "goodput_Bps"), 1e-6)
            )
        last = find_case(rec, "goodput", "scheduled", 1, 1, sizes[-1])
        if any_case:
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | "
                f"{fmt_auto(metric(last, 'cpu_us_per_rpc'))} |"
            )
    return lines


def memory_table(results: dict[str, Any]) -> list[str]:
    lines = ["| system | process | idle RSS MiB | peak RSS under load MiB |", "|---|---|---|---|"]
    for name, rec in results["systems"].items():
        if rec.get("status") not in ("ok", "partial"):
            continue
        idle: dict[str, int] = dict(rec.get("idle_rss_kib", {}))
        load: dict[str, int] = {}
        for c in rec.get("cases", []):
            if "client_idle_rss_kib" in c:
                idle["client-app"] = max(idle.get("client-app", 0), c["client_idle_rss_kib"])
            if c["case"]["workload"] == "latency" and c["case"]["mode"] == "pinned":
                pass
            for r in c.get("runs", []):
                for role, kib in r.get("rss_peak_kib", {}).items():
                    load[role] = max(load.get(role, 0), kib)
        for role in sorted(set(idle) | set(load), key=lambda r: (r == "client-app", r)):
            i = f"{idle[role] / 1024:.1f}" if role in idle else "—"
            lv = f"{load[role] / 1024:.1f}" if role in load else "—"
            lines.append(f"| {name} | {role} | {i} | {lv} |")
    return lines


POLICY_SYSTEMS = ("mrpc", "mrpc-null", "mrpc-ratelimit", "mrpc-acl")
POLICY_COLUMNS = (
    # (header, workload, mode, conc, size, metric, unit)
    ("p50 pinned", "latency", "pinned", 1, LATENCY_REQ, "p50", "µs"),
    ("p50 scheduled", "latency", "scheduled", 1, LATENCY_REQ, "p50", "µs"),
    (
        f"rate c={RATE_TARGET_CONC}",
        "rate",
        "scheduled",
        RATE_TARGET_CONC,
        RATE_REQ,
        "rate",
        "RPC/s",
    ),
    (
        f"CPU/RPC c={RATE_TARGET_CONC}",
        "rate",
        "scheduled",
        RATE_TARGET_CONC,
        RATE_REQ,
        "cpu_us_per_rpc",
        "µs",
    ),
    ("CPU/RPC pinned latency", "latency", "pinned", 1, LATENCY_REQ, "cpu_us_per_rpc", "µs"),
)


def _delta(mine: dict[str, float] | None, base: dict[str, float] | None, unit: str) -> str:
    if mine is None or base is None or not base["median"]:
        return ""
    d = mine["median"] - base["median"]
    pct = d / base["median"] * 100
    if unit == "RPC/s":
        return f"{pct:+.0f} %"
    return f"{d:+,.{_digits(abs(d))}f} {unit} ({pct:+.0f} %)"


def policy_table(results: dict[str, Any]) -> list[str]:
    """The policy systems side by side, each figure with its change against plain mrpc."""
    systems = results["systems"]
    present = [n for n in POLICY_SYSTEMS if n in systems and systems[n].get("cases")]
    if len(present) < 2 or "mrpc" not in present:
        return []
    base = systems["mrpc"]
    lines = [
        "| system | " + " | ".join(c[0] for c in POLICY_COLUMNS) + " |",
        "|---|" + "---|" * len(POLICY_COLUMNS),
    ]
    for name in present:
        cells = []
        for _h, wl, mode, conc, size, key, unit in POLICY_COLUMNS:
            mine = metric(find_case(systems[name], wl, mode, conc, 1, size), key)
            if mine is None:
                cells.append("—")
                continue
            cell = f"{fmt_auto(mine)} {unit}"
            if name != "mrpc":
                d = _delta(mine, metric(find_case(base, wl, mode, conc, 1, size), key), unit)
                cell += f"<br>Δ {d}" if d else ""
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _qos_exp(results: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for name, rec in results["systems"].items():
        exp = (rec.get("experiments") or {}).get("qos")
        if exp:
            return name, exp
    return None


def _pct(ratio: dict[str, float] | None) -> str:
    """A paired ratio spread as a change in percent: median [min–max]."""
    if ratio is None:
        return "—"
    return (
        f"{(ratio['median'] - 1) * 100:+.0f} % "
        f"<sub>[{(ratio['min'] - 1) * 100:+.0f}–{(ratio['max'] - 1) * 100:+.0f}]</sub>"
    )


def qos_section(results: dict[str, Any]) -> tuple[str, list[str]] | None:
    """The qos workload: (intro, table + verdict lines)."""
    from bench import qos

    found = _qos_exp(results)
    if found is None:
        return None
    system, exp = found
    if "error" in exp and not exp.get("phases"):
        return "", [f"The qos workload failed: {exp['error'][:300]}"]
    ana = qos.analyze(exp)
    lines = [
        (
            "| phase | qos attached | latency p50 µs | latency p99 µs | latency calls/s | "
            "bulk goodput MB/s | p99 vs both | goodput vs both | calls held by qos | "
            "CPUs busy: bench / other | verdict |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ph in exp["phases"]:
        name = ph["phase"]
        if "error" in ph and not ph.get("runs"):
            err = ph["error"].splitlines()[0][:150]
            lines.append(f"| {name} | | error: {err} | | | | | | | | |")
            continue
        s = ph.get("summary", {})
        attach = ph.get("where", "")
        v = ana["variants"].get(name)
        if v:
            verdict = (
                f"p99 {'**met**' if v['p99_met'] else '**missed**'}, "
                f"goodput {'**met**' if v['goodput_met'] else '**missed**'}"
                + (" (best)" if ana["best"] == name else "")
            )
            p99_cell, gp_cell = _pct(v["p99_ratio"]), _pct(v["goodput_ratio"])
            held = "?" if v.get("held") is None else f"{v['held']:,}"
        else:
            verdict, p99_cell, gp_cell, held = "", "", "", ""
            if name == qos.BOTH.name and ana.get("p99_both_vs_alone"):
                p99_cell = "vs alone: " + _pct(ana["p99_both_vs_alone"])
        cpus = ""
        if s.get("cpu") and s.get("foreign_cpu"):
            cpus = f"{s['cpu']['median']:.2f} / {s['foreign_cpu']['median']:.2f}"
        lines.append(
            f"| {name} | {attach or '—'} | {fmt_auto(s.get('p50'))} | {fmt_auto(s.get('p99'))} | "
            f"{fmt_auto(s.get('lat_rate'))} | {fmt_auto(s.get('bulk_goodput_Bps'), 1e-6)} | "
            f"{p99_cell} | {gp_cell} | {held} | {cpus} | {verdict} |"
        )
    lines.append("")
    settings = [ph for ph in exp["phases"] if ph.get("attach")]
    if settings:
        lines.append("Settings (`mrpcctl --prefix <daemon> ...`):")
        lines.append("")
        for ph in settings:
            cmds = "; ".join(f"`{a}`" for a in ph["attach"])
            lines.append(f"- *{ph['phase']}*: {cmds}")
        lines.append("")
    best = ana.get("best")
    if best:
        v = ana["variants"][best]
        ph = next(p for p in exp["phases"] if p["phase"] == best)
        ph.setdefault("where", "")
        ok = v["p99_met"] and v["goodput_met"]
        loss = v["goodput_loss"] * 100
        lines.append(
            f"**{'Goal met' if ok else 'Goal missed'}.** Best variant: *{best}* "
            f"({ph.get('where', '')}): latency p99 "
            f"{v['p99_improvement'] * 100:.0f} % lower than with no policy (lower in every "
            f"round: {'yes' if v['p99_met'] else 'no'}), bulk goodput "
            f"{abs(loss):.1f} % {'lower' if loss >= 0 else 'higher'} "
            f"(goal: < {qos.GOODPUT_LOSS_GOAL * 100:.0f} % lower)."
        )
    elif ana["variants"]:
        lines.append(
            "**Goal missed.** No qos variant lowered the latency app's p99 in every round."
        )
    intro = (
        f"`{system}`: a latency app ({exp['latency_req']} B requests, one outstanding call) "
        f"and a bulk app ({size_label(exp['bulk_req'])} requests, {exp['bulk_conc']} "
        f"outstanding) on daemon A, one server app on daemon B. {exp['runs']} rounds; each "
        f"round runs one {exp['duration']} s window of every phase in turn (the same two "
        "client processes throughout; qos attached before a phase's window and detached "
        "after), so figures are medians over rounds with [min–max], and the *vs both* "
        "columns are the median (and range) of the per-round ratios against `both` in the "
        "same round. Goal (issue 4): the latency app's p99 improves from `both` to `qos` "
        f"with < {qos.GOODPUT_LOSS_GOAL * 100:.0f} % loss of the bulk app's goodput; the p99 "
        "goal counts as met only if p99 was lower than `both` in *every* round, the goodput "
        "goal on the median per-round loss. The best variant is the one meeting both with "
        "the largest p99 gain, else the one improving p99 with the smallest goodput loss. "
        "*Calls held by qos*: over all rounds, from `mrpcctl stats` (0: qos changed nothing). "
        "*CPUs busy*: all processes of the workload "
        "(apps, daemons), and everything else on the host, in CPUs over the window."
    )
    return intro, lines


BREAKDOWN_CASES = (
    ("latency", "pinned", 1, 1, LATENCY_REQ, "latency pinned"),
    ("rate", "scheduled", RATE_TARGET_CONC, 1, RATE_REQ, f"rate c={RATE_TARGET_CONC}"),
    ("goodput", "scheduled", 1, 1, GOODPUT_TARGET_SIZE, "goodput 8 MiB"),
)


def cpu_breakdown_table(results: dict[str, Any]) -> list[str]:
    """µs of CPU per RPC of each process role (median over runs)."""
    lines = ["| system | case | CPU µs per RPC by process |", "|---|---|---|"]
    for name, rec in results["systems"].items():
        for wl, mode, conc, clients, size, label in BREAKDOWN_CASES:
            case = find_case(rec, wl, mode, conc, clients, size)
            runs = [r for r in (case or {}).get("runs", []) if r.get("count")]
            if not runs:
                continue
            roles = sorted({role for r in runs for role in r["cpu_s"]})
            parts = []
            for role in roles:
                per = stats.spread([r["cpu_s"].get(role, 0.0) / r["count"] * 1e6 for r in runs])
                parts.append(f"{role} {per['median']:,.{_digits(per['median'])}f}")
            lines.append(f"| {name} | {label} | {', '.join(parts)} |")
    return lines


def bind_table(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, rec in results["systems"].items():
        bind = (rec.get("extra") or {}).get("bind")
        if not bind:
            continue
        if not lines:
            lines = [
                (
                    "| system | phase | connect + stub + first call, ms | daemon bind, ms | "
                    "daemon cache level | load_proto in the app, ms |"
                ),
                "|---|---|---|---|---|---|",
            ]
        for phase, ph in bind.get("phases", {}).items():
            lines.append(
                f"| {name} | {phase} | {fmt_auto(ph['app_ms'])} | {fmt_auto(ph['daemon_ms'])} | "
                f"{', '.join(ph['levels'])} | {fmt_auto(ph['load_proto_ms'])} |"
            )
        if bind.get("error"):
            lines.append(f"| {name} | error | {bind['error'][:300]} | | | |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    plan, mach = results["plan"], results["machine"]
    v = mach.get("versions", {})
    header = (
        f"{'Quick' if plan['quick'] else 'Full'} run in {results.get('seconds', 0):.0f} s on "
        f"{mach['cpus']} CPUs ({mach['cpu_model']}), kernel {mach['kernel']}, commit "
        f"`{mach.get('commit', '?')}`. Python {v.get('python')}, grpcio {v.get('grpc')}, "
        f"protobuf {v.get('google.protobuf')}, Envoy {v.get('envoy')}."
    )
    method = (
        f"Every figure is the median of {plan['runs']} runs with [min–max]. Windows: latency "
        f"{plan['lat_duration']} s, rate {plan['rate_duration']} s, goodput "
        f"{plan['goodput_duration']} s, each after {plan['warmup']} s of warm-up. "
        "CPU per RPC is the user+sys CPU of every process involved (client apps, servers, "
        "daemons, Envoys) over the window divided by the RPCs completed in it. *Pinned*: every "
        "thread of every process of the case on CPU 0; *scheduled*: left to the kernel (this VM "
        "halts idle CPUs and charges ~50 µs to wake one, so the pinned figure is the stable one)."
    )
    out = [f"# mrpc benchmarks — {results['started']}", "", header, "", method, ""]
    notes = [s for n, r in results["systems"].items() if (s := status_line(n, r))]
    load = foreign_load(results)
    if load and load[0] > 0.05:
        notes.append(
            f"- other processes on the host used {load[0] * 100:.0f} % of a CPU on "
            f"average during the measured windows (worst case `{load[2]}`: "
            f"{load[1] * 100:.0f} %): figures are disturbed, compare within this run"
        )
    end = results.get("code_end")
    if end and (end.get("commit"), end.get("dirty")) != (mach.get("commit"), mach.get("dirty")):
        notes.append(
            f"- the code changed during the run (shared working tree): HEAD "
            f"`{mach.get('commit')}` → `{end.get('commit')}`, uncommitted changes outside "
            f"bench/ at start {mach.get('dirty') or 'none'}, at end {end.get('dirty') or 'none'}; "
            "systems started after the change ran the newer code"
        )
    elif mach.get("dirty"):
        notes.append(f"- uncommitted changes outside bench/ during the run: {mach['dirty']}")
    if results.get("shm_leftovers"):
        notes.append(f"- left in /dev/shm after the run: {results['shm_leftovers']}")
    if notes:
        out += ["## Skipped, failed, warnings", "", *notes, ""]

    def section(title: str, intro: str | None, body: list[str]) -> None:
        out.extend([f"## {title}", ""])
        if intro:
            out.extend([intro, ""])
        out.extend([*body, ""])

    base_sec = compare.section(results)
    if base_sec:
        bl = results["baseline"]
        section(f"Baseline: working tree vs `{bl['rev']}`", None, base_sec)
    section(
        "Targets",
        (
            "Latency targets use the pinned cases; rate, goodput and CPU use the scheduled "
            "cases (those need both CPUs). All from this one run."
        ),
        targets_table(results),
    )
    for mode in ("pinned", "scheduled"):
        section(
            f"Latency, {mode} ({LATENCY_REQ} B request, {REPLY_SIZE} B reply, one call)",
            None,
            latency_table(results, mode),
        )
    section(
        f"Rate (RPC/s, {RATE_REQ} B requests, {REPLY_SIZE} B replies)",
        "c = outstanding calls per client process.",
        rate_table(results, "rate"),
    )
    section(
        "CPU per small RPC (µs of CPU, all processes, rate cases)",
        None,
        rate_table(results, "cpu_us_per_rpc"),
    )
    section("Latency under load (p50 µs, rate cases)", None, rate_table(results, "p50"))
    policy = policy_table(results)
    if policy:
        section(
            "Policy overhead",
            (
                "Each policy system against plain `mrpc` in this run (Δ: change of the "
                "median; the [min–max] spreads show how much of it is noise). `mrpc-null`: the "
                "no-op engine on both daemons, every app (send side); `mrpc-ratelimit`: "
                "ratelimit at 10^8 tokens/s on the client app, daemon A, send side; "
                "`mrpc-acl`: acl (default allow, one never-matching deny rule on `payload`) on "
                "the client app, daemon A, send side. CPU is all processes, per RPC."
            ),
            policy,
        )
    qos_sec = qos_section(results)
    if qos_sec:
        section("QoS: a latency-sensitive app next to a bulk app", qos_sec[0] or None, qos_sec[1])
    section(
        "Where the CPU goes (µs of CPU per RPC, by process)",
        "`+child` rows are processes forked by that process.",
        cpu_breakdown_table(results),
    )
    section(
        f"Goodput (MB/s of request payload, {REPLY_SIZE} B replies, one outstanding call)",
        (
            "`socket-stream` is a plain one-way Python TCP stream of the same chunks, the "
            "reference for the 8 MiB target."
        ),
        goodput_table(results),
    )
    section(
        "Memory (RSS)",
        (
            "Idle: after start (servers) or after connecting (client app); under load: the "
            f"peak sampled every {plan['sample_interval']} s over all cases."
        ),
        memory_table(results),
    )
    bind = bind_table(results)
    if bind:
        section(
            "Bind time (mrpc)",
            (
                "A fresh app process each time. *cold*: first app on a daemon whose prefix "
                "never bound the schema; *warm daemon*: a second app on that daemon; *cached*: "
                "an app on a daemon restarted on the same prefix (on-disk binding cache). The "
                "daemon binds during the first call; its own figure is from libmrpc's log."
            ),
            bind,
        )
    section(
        "Systems",
        None,
        [f"- **{name}**: {rec.get('summary', '')}" for name, rec in results["systems"].items()],
    )
    out.append(
        "Plots: `latency_cdf.png`, `rate_vs_concurrency.png`, `goodput_vs_size.png`, "
        "`cpu_per_rpc.png`"
        + (", `qos_latency_cdf.png`" if qos_sec else "")
        + ". Raw data: `results.json`; process logs: `logs/`."
    )
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- plots


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    systems = results["systems"]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, mode in zip(axes, ("pinned", "scheduled"), strict=True):
        for name, rec in systems.items():
            lat_case = find_case(rec, "latency", mode, 1, 1, LATENCY_REQ)
            if lat_case is None or "error" in lat_case or not lat_case["runs"]:
                continue
            runs = sorted(lat_case["runs"], key=lambda r: r["lat"].get("p50", 0))
            cdf = runs[len(runs) // 2].get("cdf") or []
            if cdf:
                ax.plot(
                    [p[0] for p in cdf], [p[1] for p in cdf], label=name, color=COLORS.get(name)
                )
        ax.set_xscale("log")
        ax.set_title(f"RTT CDF, {mode} ({LATENCY_REQ} B / {REPLY_SIZE} B, median run)")
        ax.set_xlabel("round-trip time (µs, log)")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    axes[0].set_ylabel("fraction of calls")
    written.append(_save(fig, out_dir / "latency_cdf.png"))

    concs = _concs(results)
    for key, fname, ylabel, title in (
        ("rate", "rate_vs_concurrency.png", "RPC/s (log)", "Small-RPC rate"),
        (
            "cpu_us_per_rpc",
            "cpu_per_rpc.png",
            "CPU µs per RPC, all processes (log)",
            "CPU per small RPC",
        ),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, clients in zip(axes, (1, 2), strict=True):
            for name, rec in systems.items():
                xs: list[float] = []
                ys: list[float] = []
                lo: list[float] = []
                hi: list[float] = []
                for conc in concs:
                    m = metric(find_case(rec, "rate", "scheduled", conc, clients, RATE_REQ), key)
                    if m:
                        xs.append(conc)
                        ys.append(m["median"])
                        lo.append(m["median"] - m["min"])
                        hi.append(m["max"] - m["median"])
                if xs:
                    ax.errorbar(
                        xs,
                        ys,
                        yerr=[lo, hi],
                        marker="o",
                        capsize=3,
                        label=name,
                        color=COLORS.get(name),
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(concs, [str(conc) for conc in concs])
            ax.set_title(f"{title}, {clients} client process{'es' if clients > 1 else ''}")
            ax.set_xlabel("outstanding calls per client process")
            ax.grid(True, which="both", alpha=0.3)
            _legend(ax)
        axes[0].set_ylabel(ylabel)
        written.append(_save(fig, out_dir / fname))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = results["plan"]["goodput_sizes"]
    for name, rec in systems.items():
        xs, ys, lo, hi = [], [], [], []
        for s in sizes:
            m = metric(find_case(rec, "goodput", "scheduled", 1, 1, s), "goodput_Bps")
            if m:
                xs.append(s)
                ys.append(m["median"] / 1e6)
                lo.append((m["median"] - m["min"]) / 1e6)
                hi.append((m["max"] - m["median"]) / 1e6)
        if xs:
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi],
                marker="s" if len(xs) == 1 else "o",
                capsize=3,
                label=name,
                color=COLORS.get(name),
                markersize=8 if len(xs) == 1 else 5,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [size_label(s) for s in sizes])
    ax.set_xlabel("request size (reply 8 B)")
    ax.set_ylabel("goodput, MB/s (log)")
    ax.set_title("Goodput vs request size, one outstanding call")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    written.append(_save(fig, out_dir / "goodput_vs_size.png"))
    found = _qos_exp(results)
    if found and any(p.get("runs") for p in found[1].get("phases", [])):
        written.append(qos_plot(found[1], out_dir / "qos_latency_cdf.png"))
    return written


def qos_plot(exp: dict[str, Any], path: Path) -> Path:
    """The latency app's RTT CDF per qos phase (median run by p99), and bulk goodput."""
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    names, goodput, lo, hi = [], [], [], []
    for ph in exp["phases"]:
        runs = sorted(ph.get("runs", []), key=lambda r: r["lat"].get("p99", 0))
        if not runs:
            continue
        cdf = runs[len(runs) // 2].get("cdf") or []
        if cdf:
            ax.plot([p[0] for p in cdf], [p[1] for p in cdf], label=ph["phase"])
        m = ph.get("summary", {}).get("bulk_goodput_Bps")
        if m and m.get("runs"):
            names.append(ph["phase"])
            goodput.append(m["median"] / 1e6)
            lo.append((m["median"] - m["min"]) / 1e6)
            hi.append((m["max"] - m["median"]) / 1e6)
    ax.set_xscale("log")
    ax.set_xlabel("latency app round-trip time (µs, log)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Latency app RTT CDF per phase (median run by p99)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    if names:
        bx.barh(range(len(names)), goodput, xerr=[lo, hi], capsize=3, color="tab:gray")
        bx.set_yticks(range(len(names)), names, fontsize=8)
        bx.invert_yaxis()
    bx.set_xlabel("bulk app goodput, MB/s (median, [min–max])")
    bx.set_title(f"Bulk app, {size_label(exp['bulk_req'])} × {exp['bulk_conc']} outstanding")
    bx.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    md = out_dir / "results.md"
    md.write_text(markdown(results))
    return [md, *plots(results, out_dir)]
