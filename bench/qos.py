"""The ``qos`` workload: does the ``qos`` policy protect a latency-sensitive app from a bulk one?

Two client apps on daemon A share one server app on daemon B (the ``mrpc``
system's daemons and server, after its other cases):

* ``bench-latency``: one outstanding 64 B call at a time (sync stub); p50/p99.
* ``bench-bulk``: 32 KiB requests, 64 outstanding (asyncio tasks); goodput.

One latency and one bulk client process serve every phase; in a phase with both
apps, both measure over the same windows. Phases:

* ``alone``: the latency app by itself;
* ``both``: both apps, no policy;
* ``qos ...``: both apps with ``qos`` attached on daemon A to *both* apps (the
  latency app with ``latency_sensitive=true``), once per settings variant; a
  variant may also attach ``qos`` on daemon B to the server app's receive side.

The goal (issue 4): the latency app's p99 improves from ``both`` to ``qos`` while
the bulk app loses < 5 % of its goodput. The phases are interleaved (round r runs
one window of every phase), so drifting load from other work on the host hits
every phase alike.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs, stats
from bench.plan import KIB, LATENCY_REQ, MAX_CALLS, Plan

LATENCY_APP = "bench-latency"
BULK_APP = "bench-bulk"
BULK_REQ = 32 * KIB
BULK_CONC = 64
P99_GOAL = "p99 lower with qos than without"
GOODPUT_LOSS_GOAL = 0.05  # bulk goodput may drop by less than this fraction


@dataclass(frozen=True)
class Attach:
    """One ``mrpcctl policy attach qos`` on daemon ``daemon`` (A or B)."""

    daemon: str
    app: str
    side: str = "send"
    sets: tuple[str, ...] = ()

    def text(self) -> str:
        sets = "".join(f" --set {s}" for s in self.sets)
        return f"daemon {self.daemon}: policy attach qos --app {self.app} --side {self.side}{sets}"


@dataclass(frozen=True)
class Phase:
    name: str
    apps: tuple[str, ...]
    attach: tuple[Attach, ...] = ()
    note: str = ""


def qos_variant(
    name: str, *, bulk: tuple[str, ...] = (), receive: tuple[str, ...] | None = None
) -> Phase:
    """Both apps with qos on daemon A (latency app latency_sensitive, bulk app with ``bulk``
    settings); with ``receive``, also qos on daemon B on the server app's receive side."""
    attach = [
        Attach("A", LATENCY_APP, "send", ("latency_sensitive=true", *bulk)),
        Attach("A", BULK_APP, "send", bulk),
    ]
    if receive is not None:
        attach.append(Attach("B", "bench-server", "receive", receive))
    return Phase(name, (LATENCY_APP, BULK_APP), tuple(attach))


def where(ph: Phase) -> str:
    """Where a phase attaches qos, in a few words."""
    parts = []
    if any(a.daemon == "A" for a in ph.attach):
        parts.append("A: both client apps")
    if any(a.daemon == "B" for a in ph.attach):
        parts.append("B: server app, receive side")
    return "; ".join(parts)


ALONE = Phase("alone", (LATENCY_APP,))
BOTH = Phase("both", (LATENCY_APP, BULK_APP))


def _config(system: Any, server_info: dict[str, Any], app: str) -> dict[str, Any]:
    if app == LATENCY_APP:
        case = {"conc": 1, "req_size": LATENCY_REQ, "app_name": app}
    else:
        case = {"conc": BULK_CONC, "req_size": BULK_REQ, "app_name": app}
    return {"driver": system.driver, "server": server_info, "case": case}


class _Attached:
    """The qos engines one phase attached; detached when the phase's window is over."""

    def __init__(self, prefixes: dict[str, Path], mrpcctl: Any) -> None:
        self.prefixes, self.mrpcctl = prefixes, mrpcctl
        self.done: list[tuple[str, str]] = []

    def attach(self, a: Attach) -> None:
        argv = ["policy", "attach", "qos", "--app", a.app, "--side", a.side]
        for pair in a.sets:
            argv += ["--set", pair]
        self.mrpcctl(self.prefixes[a.daemon], *argv)
        self.done.append((a.daemon, a.app))

    def detach_all(self) -> list[str]:
        errors = []
        for daemon, app in self.done:
            try:
                self.mrpcctl(
                    self.prefixes[daemon], "policy", "detach", "--app", app, "--engine", "qos"
                )
            except Exception as exc:  # noqa: BLE001 - reported; the next phase may still run
                errors.append(str(exc)[:300])
        self.done.clear()
        return errors


def _window(
    system: Any, workers: Any, idx: list[int], plan: Plan
) -> tuple[list[dict[str, Any]], float, float, float]:
    """One measured window of the workers ``idx``: (results, wall s, CPU s, foreign CPU s)."""
    duration = plan.qos_duration
    workers.send(
        {
            "cmd": "run",
            "duration": duration,
            "warmup": plan.qos_warmup,
            "max_calls": MAX_CALLS,
            "cdf": True,
        },
        only=idx,
    )
    workers.expect("warm", duration + plan.qos_warmup + 60.0, only=idx)
    pids = system.accounted()
    snap0 = procs.cpu_snapshot(pids)
    busy0 = procs.host_busy_s()
    t0 = time.monotonic()
    workers.send({"cmd": "go"}, only=idx)
    results = workers.expect("result", duration + 60.0, only=idx)
    wall = time.monotonic() - t0
    server_cpu = sum(procs.cpu_delta_s(snap0, procs.cpu_snapshot(pids)).values())
    busy = procs.host_busy_s() - busy0
    cpu = server_cpu + sum(x["cpu_s"] for x in results)
    return results, wall, cpu, max(0.0, busy - cpu)


def run(
    system: Any, server_info: dict[str, Any], plan: Plan, log_dir: Path, progress: Any
) -> dict[str, Any]:
    """Every phase of the qos workload on ``system`` (an ``Mrpc`` instance, started).

    One latency and one bulk client process serve every phase. The phases are
    interleaved: round r runs one window of each phase in turn (attaching that
    phase's qos engines before its window and detaching them after), so load
    from other work on the host drifts over every phase alike.
    """
    from bench.runner import CaseError, Workers
    from bench.systems.mrpc_systems import mrpcctl

    phases = [ALONE, BOTH, *plan_variants(plan)]
    out: dict[str, Any] = {
        "latency_app": LATENCY_APP,
        "bulk_app": BULK_APP,
        "bulk_req": BULK_REQ,
        "bulk_conc": BULK_CONC,
        "latency_req": LATENCY_REQ,
        "runs": plan.qos_runs,
        "duration": plan.qos_duration,
        "phases": [
            {
                "phase": ph.name,
                "apps": list(ph.apps),
                "attach": [a.text() for a in ph.attach],
                "where": where(ph),
                "runs": [],
            }
            for ph in phases
        ],
    }
    apps = [LATENCY_APP, BULK_APP]
    specs = [(f"qos-{app}", _config(system, server_info, app)) for app in apps]
    workers = Workers.of(specs, log_dir)
    engines = _Attached({"A": system.dir_a, "B": system.dir_b}, mrpcctl)
    t0 = time.monotonic()
    try:
        workers.expect("ready", 90.0)
        for rnd in range(plan.qos_runs):
            for ph, rec in zip(phases, out["phases"], strict=True):
                if "error" in rec:
                    continue
                try:
                    for a in ph.attach:
                        engines.attach(a)
                    idx = [apps.index(app) for app in ph.apps]
                    results, wall, cpu, foreign = _window(system, workers, idx, plan)
                    if ph.attach:
                        rec.setdefault("engine_stats", []).append(_qos_stats(engines.prefixes))
                except RuntimeError as exc:  # mrpcctl failed: this phase is out, others go on
                    rec["error"] = str(exc)
                    continue
                finally:
                    if errors := engines.detach_all():
                        rec.setdefault("detach_errors", []).extend(errors)
                rec["runs"].append(_run_record(rnd, ph, results, wall, cpu, foreign))
            progress(f"{system.name}: qos: round {rnd + 1}/{plan.qos_runs} done")
    except CaseError as exc:
        out["error"] = str(exc)
    finally:
        engines.detach_all()
        workers.close()
    for rec in out["phases"]:
        rec["summary"] = summarize(rec["runs"])
        progress(f"{system.name}: qos/{rec['phase']}: {_brief(rec)}")
    out["seconds"] = time.monotonic() - t0
    return out


def _run_record(
    rnd: int, ph: Phase, results: list[dict[str, Any]], wall: float, cpu: float, foreign: float
) -> dict[str, Any]:
    by_app = dict(zip(ph.apps, results, strict=True))
    lat = by_app[LATENCY_APP]
    r: dict[str, Any] = {
        "run": rnd,
        "lat": lat["lat"],
        "lat_count": lat["count"],
        "lat_rate": lat["count"] / lat["elapsed_s"] if lat["elapsed_s"] > 0 else math.nan,
        "lat_errors": lat["errors"],
        "cdf": lat.get("cdf", []),
        "wall_s": wall,
        "cpu_s": cpu,
        "foreign_cpu_s": foreign,
        "error_samples": [e for x in results for e in x.get("error_samples", [])][:3],
    }
    if BULK_APP in by_app:
        b = by_app[BULK_APP]
        r["bulk_goodput_Bps"] = (
            b["count"] * BULK_REQ / b["elapsed_s"] if b["elapsed_s"] > 0 else math.nan
        )
        r["bulk_count"] = b["count"]
        r["bulk_errors"] = b["errors"]
        r["bulk_p50_us"] = b["lat"].get("p50")
    return r


def _qos_stats(prefixes: dict[str, Path]) -> dict[str, Any]:
    """Counters of every attached qos engine on both daemons."""
    from bench.systems.mrpc_systems import mrpcctl

    out: dict[str, Any] = {}
    for daemon, prefix in prefixes.items():
        data = json.loads(mrpcctl(prefix, "stats", "--json"))
        for app in data.get("apps", []):
            for e in app.get("engines", []):
                if e.get("engine") == "qos":
                    out[f"{daemon}:{e.get('engine_id')}"] = e.get("stats", {})
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if r.get("lat_count")]
    out: dict[str, Any] = {"runs": len(good)}
    if not good:
        return out
    for p in ("p50", "p99", "p99.9"):
        out[p] = stats.spread([r["lat"].get(p, math.nan) for r in good])
    if any("bulk_goodput_Bps" in r for r in good):
        out["bulk_goodput_Bps"] = stats.spread([r.get("bulk_goodput_Bps", math.nan) for r in good])
    out["lat_calls"] = stats.spread([r["lat_count"] for r in good])
    out["lat_rate"] = stats.spread([r["lat_rate"] for r in good])
    out["cpu"] = stats.spread([r["cpu_s"] / r["wall_s"] for r in good])  # CPUs busy
    out["foreign_cpu"] = stats.spread([r["foreign_cpu_s"] / r["wall_s"] for r in good])
    out["errors"] = sum(r.get("lat_errors", 0) + r.get("bulk_errors", 0) for r in good)
    return out


def plan_variants(plan: Plan) -> list[Phase]:
    return [
        qos_variant(v["name"], bulk=tuple(v["bulk"]), receive=_tuple(v.get("receive")))
        for v in plan.qos_variants
    ]


def _tuple(x: Any) -> tuple[str, ...] | None:
    return None if x is None else tuple(x)


def _brief(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return "ERROR " + rec["error"].splitlines()[0][:120]
    s = rec["summary"]
    if not s.get("runs"):
        return "no data"
    text = f"latency p50 {s['p50']['median']:.0f} us, p99 {s['p99']['median']:.0f} us"
    if "bulk_goodput_Bps" in s:
        text += f", bulk {s['bulk_goodput_Bps']['median'] / 1e6:.1f} MB/s"
    return text


# ----------------------------------------------------------------------------- analysis


def _paired(base: dict[str, Any], other: dict[str, Any], key: str) -> dict[str, float] | None:
    """Spread over rounds of ``other / base`` for ``key`` (same round: same host load)."""

    def value(r: dict[str, Any]) -> float:
        return r["lat"].get(key, math.nan) if key.startswith("p") else r.get(key, math.nan)

    by_round = {r["run"]: value(r) for r in base.get("runs", [])}
    ratios = [
        value(r) / by_round[r["run"]]
        for r in other.get("runs", [])
        if by_round.get(r["run"]) and not math.isnan(value(r))
    ]
    return stats.spread(ratios) if ratios else None


def held_calls(ph: dict[str, Any]) -> int | None:
    """Calls the phase's qos engines held, over all rounds (None if not known)."""
    rounds = [r for r in ph.get("engine_stats", []) if isinstance(r, dict) and "error" not in r]
    if not rounds:
        return None
    return sum(int(st.get("held", 0)) for r in rounds for st in r.values())


def analyze(exp: dict[str, Any]) -> dict[str, Any]:
    """Per qos variant: p99 and goodput against ``both`` (paired by round), goal verdicts,
    and the best variant: the largest p99 improvement among variants that meet both goals;
    when none does, the smallest goodput loss among variants that improve p99.

    The p99 goal counts as met only when p99 was lower than ``both`` in every round; the
    goodput goal when the median per-round loss is below ``GOODPUT_LOSS_GOAL``."""
    phases = {p["phase"]: p for p in exp.get("phases", [])}
    both = phases.get(BOTH.name)
    out: dict[str, Any] = {"variants": {}, "best": None}
    if both is None or not both.get("runs"):
        return out
    alone = phases.get(ALONE.name)
    if alone and alone.get("runs"):
        out["p99_both_vs_alone"] = _paired(alone, both, "p99")
    for name, ph in phases.items():
        if name in (ALONE.name, BOTH.name) or not ph.get("runs"):
            continue
        p99 = _paired(both, ph, "p99")
        p50 = _paired(both, ph, "p50")
        gp = _paired(both, ph, "bulk_goodput_Bps")
        if p99 is None or gp is None:
            continue
        improvement = 1.0 - p99["median"]
        loss = 1.0 - gp["median"]
        out["variants"][name] = {
            "p50_ratio": p50,
            "p99_ratio": p99,
            "goodput_ratio": gp,
            "p99_improvement": improvement,
            "goodput_loss": loss,
            # improved in every round, not only in the median: a no-op must not pass on noise
            "p99_met": p99["max"] < 1.0,
            "goodput_met": loss < GOODPUT_LOSS_GOAL,
            "held": held_calls(ph),
        }
    v = out["variants"]
    both_met = [n for n in v if v[n]["p99_met"] and v[n]["goodput_met"]]
    improving = [n for n in v if v[n]["p99_met"]]
    if both_met:
        out["best"] = max(both_met, key=lambda n: v[n]["p99_improvement"])
    elif improving:
        out["best"] = min(improving, key=lambda n: v[n]["goodput_loss"])
    return out
