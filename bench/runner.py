"""Orchestration: start each system, run its cases, account CPU and memory.

For every system: start its server side (servers, daemons, sidecars), record
idle RSS, then for each case start the client worker process(es), and repeat
the measured window ``plan.runs`` times. Per run the runner snapshots the CPU
of every server-side process (descendants included) right before telling the
clients "go" and right after the last result, and samples RSS of everything
every ``plan.sample_interval`` seconds. Pinned cases put every thread of every
process involved on CPU 0 (clients are started pinned; servers are re-pinned
thread by thread and unpinned afterwards).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from bench import baseline, procs, stats
from bench.baseline import wrong_code
from bench.plan import MAX_CALLS, REPLY_SIZE, Case, Plan
from bench.systems import EXPERIMENTS, WORKLOADS, StartContext, System, Unavailable, registry

log = logging.getLogger(__name__)

ALL_WORKLOADS = (*WORKLOADS, *EXPERIMENTS)
READY_TIMEOUT_S = 90.0
MAX_RESTARTS = 1
PINNED_CPUS = (0,)
# mrpcd re-reads its CPU affinity (it busy-polls only with more than one CPU) whenever its
# runtime goes to sleep, at most every 0.1 s; the first call of a case wakes it, so the
# new affinity applies within the warm-up: wait only this long after changing it.
AFFINITY_SETTLE_S = 0.3
_affinity_changed = 0.0


def _set_affinity(pids: dict[int, str], cpus: Any) -> None:
    global _affinity_changed
    procs.set_affinity_all_threads(pids, cpus)
    _affinity_changed = time.monotonic()


def _settle() -> None:
    """Wait until server-side processes have had time to notice an affinity change."""
    left = _affinity_changed + AFFINITY_SETTLE_S - time.monotonic()
    if left > 0:
        time.sleep(left)


class CaseError(RuntimeError):
    pass


class Workers:
    """The client worker processes of one case, driven over their stdin/stdout."""

    def __init__(
        self, system: System, server_info: dict[str, Any], case: Case, log_dir: Path
    ) -> None:
        config = {
            "driver": system.driver,
            "server": server_info,
            "case": {"conc": case.conc, "req_size": case.req_size},
        }
        safe = case.key.replace("/", "_")
        self._spawn(
            [(f"client-{safe}-{i}", config) for i in range(case.clients)],
            log_dir,
            PINNED_CPUS if case.mode == "pinned" else None,
            system.code_root,
        )

    @classmethod
    def of(
        cls,
        specs: list[tuple[str, dict[str, Any]]],
        log_dir: Path,
        cpus: Any = None,
        root: Path = procs.REPO_ROOT,
    ) -> Workers:
        """Worker processes with different configs: ``(role, {"driver", "server", "case"})``."""
        self = cls.__new__(cls)
        self._spawn(specs, log_dir, cpus, root)
        return self

    def _spawn(
        self, specs: list[tuple[str, dict[str, Any]]], log_dir: Path, cpus: Any, root: Path
    ) -> None:
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.procs: list[procs.Proc] = []
        for i, (role, config) in enumerate(specs):
            p = procs.spawn(
                role,
                procs.python_argv("bench.worker", json.dumps(config)),
                log_dir=log_dir,
                cpus=cpus,
                stdin_pipe=True,
                stdout_pipe=True,
                root=root,
            )
            self.procs.append(p)
            threading.Thread(target=self._reader, args=(i, p), daemon=True).start()

    def _reader(self, i: int, p: procs.Proc) -> None:
        assert p.popen.stdout is not None
        for _ in range(100_000):
            line = p.popen.stdout.readline()
            if not line:
                self.events.put((i, {"event": "eof"}))
                return
            try:
                self.events.put((i, json.loads(line)))
            except json.JSONDecodeError:
                log.warning("worker %d said: %s", i, line[:200])

    def send(self, obj: dict[str, Any], only: list[int] | None = None) -> None:
        """Send a command to every worker (or to the workers numbered in ``only``)."""
        data = (json.dumps(obj) + "\n").encode()
        for i, p in enumerate(self.procs):
            if only is not None and i not in only:
                continue
            assert p.popen.stdin is not None
            p.popen.stdin.write(data)
            p.popen.stdin.flush()

    def expect(
        self, event: str, timeout: float, only: list[int] | None = None
    ) -> list[dict[str, Any]]:
        """One ``event`` from every worker (or those in ``only``), in worker order;
        CaseError otherwise."""
        got: dict[int, dict[str, Any]] = {}
        want = len(self.procs) if only is None else len(only)
        deadline = time.monotonic() + timeout
        while len(got) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CaseError(f"timed out after {timeout:.0f}s waiting for {event!r}")
            try:
                i, obj = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if obj.get("event") == event:
                got[i] = obj
            elif obj.get("event") == "error":
                raise CaseError(f"client {i} failed:\n{obj.get('message', '')}")
            elif obj.get("event") == "eof":
                raise CaseError(f"client {i} exited before {event!r}:\n{self.procs[i].log_tail()}")
        return [got[i] for i in sorted(got)]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            try:
                if p.alive() and p.popen.stdin is not None:
                    p.popen.stdin.write(b'{"cmd": "exit"}\n')
                    p.popen.stdin.flush()
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            procs.stop(p, grace=1.0)


class RssSampler:
    """Peak RSS per pid, sampled on a background thread."""

    def __init__(self, pids: dict[int, str], interval: float) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._sample()

    def _sample(self) -> None:
        for pid in self.pids:
            kib = procs.rss_kib(pid)
            if kib is not None and kib > self.peak.get(pid, 0):
                self.peak[pid] = kib

    def _run(self) -> None:
        for _ in range(100_000):
            self._sample()
            if self._stop.wait(self.interval):
                return

    def by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pid, kib in self.peak.items():
            role = self.pids[pid]
            out[role] = max(out.get(role, 0), kib)
        return out


def _role_rss(pids: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for pid, role in pids.items():
        kib = procs.rss_kib(pid)
        if kib is not None:
            out[role] = max(out.get(role, 0), kib)
    return out


class CaseRun:
    """One case of one system: :meth:`open` starts its clients, each :meth:`measure` runs
    one window (so two systems' windows can alternate: bench/paired.py), :meth:`close`
    stops the clients and summarizes."""

    def __init__(
        self, system: System, server_info: dict[str, Any], case: Case, plan: Plan, log_dir: Path
    ) -> None:
        self.system, self.server_info, self.case, self.plan = system, server_info, case, plan
        self.log_dir = log_dir
        self.cpus = PINNED_CPUS if case.mode == "pinned" else sorted(procs.ALL_CPUS)
        self.duration = plan.duration(case)
        self.record: dict[str, Any] = {"case": case.to_json(), "runs": []}
        self.workers: Workers | None = None

    def open(self) -> None:
        """Start the clients and wait until they are connected; CaseError otherwise."""
        if self.case.mode == "pinned":
            _set_affinity(self.system.accounted(), self.cpus)
        self.workers = Workers(self.system, self.server_info, self.case, self.log_dir)
        ready = self.workers.expect("ready", READY_TIMEOUT_S)
        for i, r in enumerate(ready):
            code = (r.get("info") or {}).get("code")
            problem = wrong_code(code, self.system.code_root) if code is not None else None
            if problem:
                raise CaseError(f"client {i} {problem}")
        self.record["client_info"] = ready[0].get("info", {})
        self.record["client_idle_rss_kib"] = max(r.get("rss_kib") or 0 for r in ready)
        self.system.on_clients_ready(ready)
        if self.case.mode == "pinned":  # threads a hook may have started
            procs.set_affinity_all_threads(self.system.accounted(), self.cpus)

    def measure(self, run: int) -> dict[str, Any]:
        """One warm-up and measured window; its record (also kept in ``self.record``)."""
        assert self.workers is not None, "open() first"
        workers, plan, duration = self.workers, self.plan, self.duration
        _settle()
        workers.send(
            {
                "cmd": "run",
                "duration": duration,
                "warmup": plan.warmup,
                "max_calls": MAX_CALLS,
                "cdf": self.case.workload == "latency",
            }
        )
        workers.expect("warm", duration + plan.warmup + 60.0)
        server_pids = self.system.accounted()
        watched = dict(server_pids) | {pid: "client-app" for pid in workers.pids()}
        with RssSampler(watched, plan.sample_interval) as sampler:
            snap0 = procs.cpu_snapshot(server_pids)
            busy0 = procs.host_busy_s()
            t0 = time.monotonic()
            workers.send({"cmd": "go"})
            results = workers.expect("result", duration + 60.0)
            snap1 = procs.cpu_snapshot(server_pids)
            busy1 = procs.host_busy_s()
            wall = time.monotonic() - t0
        rec = _run_record(
            run, results, server_pids, snap0, snap1, wall, sampler.by_role(), self.case
        )
        # CPU the host spent on processes that are not part of this case (other work on
        # the machine disturbs the figures; the report warns when it is large).
        rec["host_busy_s"] = busy1 - busy0
        rec["foreign_cpu_s"] = max(0.0, busy1 - busy0 - sum(rec["cpu_s"].values()))
        rec["started"] = t0
        self.record["runs"].append(rec)
        return rec

    def fail(self, exc: CaseError) -> None:
        self.record.setdefault("error", str(exc))

    @property
    def failed(self) -> bool:
        return "error" in self.record

    def close(self) -> dict[str, Any]:
        """Stop the clients, unpin, summarize; the case's raw record."""
        try:
            if self.workers is not None:
                self.workers.close()
        finally:
            if self.case.mode == "pinned":
                _set_affinity(self.system.accounted(), sorted(procs.ALL_CPUS))
        self.record["summary"] = summarize_case(self.record)
        return self.record


def run_case(
    system: System, server_info: dict[str, Any], case: Case, plan: Plan, log_dir: Path
) -> dict[str, Any]:
    """Run every repeat of one case; return its raw record."""
    cr = CaseRun(system, server_info, case, plan, log_dir)
    try:
        cr.open()
        for run in range(plan.runs):
            cr.measure(run)
    except CaseError as exc:
        cr.fail(exc)
    finally:
        record = cr.close()
    return record


def _run_record(
    run: int,
    results: list[dict[str, Any]],
    server_pids: dict[int, str],
    snap0: Any,
    snap1: Any,
    wall: float,
    rss: dict[str, int],
    case: Case,
) -> dict[str, Any]:
    deltas = procs.cpu_delta_s(snap0, snap1)
    cpu_by_role: dict[str, float] = {}
    for pid, sec in deltas.items():
        role = server_pids.get(pid, str(pid))
        cpu_by_role[role] = cpu_by_role.get(role, 0.0) + sec
    cpu_by_role["client-app"] = sum(r["cpu_s"] for r in results)
    count = sum(r["count"] for r in results)
    rate = sum(r["count"] / r["elapsed_s"] for r in results if r["elapsed_s"] > 0)
    errors = sum(r["errors"] for r in results)
    total_cpu = sum(cpu_by_role.values())
    out: dict[str, Any] = {
        "run": run,
        "count": count,
        "errors": errors,
        "error_samples": [e for r in results for e in r.get("error_samples", [])][:3],
        "rate": rate,
        "goodput_Bps": rate * case.req_size,
        "wall_s": wall,
        "cpu_s": cpu_by_role,
        "cpu_us_per_rpc": (total_cpu / count * 1e6) if count else math.nan,
        "rss_peak_kib": rss,
        "lat": _combine_lat([r["lat"] for r in results]),
    }
    if "cdf" in results[0]:
        out["cdf"] = results[0]["cdf"]
    return out


def _combine_lat(parts: list[dict[str, float]]) -> dict[str, float]:
    if len(parts) == 1:
        return parts[0]
    # Percentiles do not merge; with several clients report the median client's.
    keys = parts[0].keys()
    return {k: stats.spread([p.get(k, math.nan) for p in parts])["median"] for k in keys}


def summarize_case(record: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in record["runs"] if r["count"] > 0]
    out: dict[str, Any] = {"runs": len(runs)}
    if not runs:
        return out
    out["rate"] = stats.spread([r["rate"] for r in runs])
    out["goodput_Bps"] = stats.spread([r["goodput_Bps"] for r in runs])
    out["cpu_us_per_rpc"] = stats.spread([r["cpu_us_per_rpc"] for r in runs])
    for p in ("p50", "p99", "p99.9"):
        out[p] = stats.spread([r["lat"].get(p, math.nan) for r in runs])
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def run_system(
    cls: type[System],
    plan: Plan,
    out_dir: Path,
    scratch: Path,
    progress: Any,
    workloads: tuple[str, ...] = ALL_WORKLOADS,
) -> dict[str, Any]:
    system = cls()
    rec: dict[str, Any] = {"name": cls.name, "summary": cls.summary, "cases": []}
    cases = plan.cases([w for w in cls.workloads if w in workloads])
    experiments = [e for e in cls.experiments if e in workloads]
    if not cases and not experiments:
        rec.update(status="skipped", reason=f"runs none of {', '.join(workloads)}")
        progress(f"{cls.name}: skipped: runs none of the selected workloads")
        return rec
    try:
        system.check()
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
        progress(f"{cls.name}: skipped: {exc}")
        return rec
    ctx = StartContext(
        workdir=scratch / cls.name,
        log_dir=out_dir / "logs" / cls.name,
        reply_size=REPLY_SIZE,
        lifetime_s=900.0,
    )
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        server_info = system.start(ctx)
        rec["server_info"] = server_info
        time.sleep(0.3)  # let the servers settle before the idle snapshot
        rec["idle_rss_kib"] = _role_rss(system.accounted())
        progress(f"{cls.name}: started in {time.monotonic() - t0:.1f}s")
        dead_starts = 0
        restarts: list[str] = []

        def restart_if_dead(when: str) -> bool:
            """Restart the system if a server-side process died; False when out of restarts.

            Processes die by crashing, or because something outside the bench killed them
            (this machine is shared): note it and restart the whole system once.
            """
            nonlocal server_info
            dead = [f"{p.role} (exit {p.popen.returncode})" for p in system.procs if not p.alive()]
            if not dead:
                return True
            note = f"{when}: {', '.join(dead)} had exited; restarted the system"
            progress(f"{cls.name}: {note}")
            restarts.append(note)
            rec["restarts"] = restarts
            if len(restarts) > MAX_RESTARTS:
                rec["gave_up"] = "server-side processes kept dying"
                return False
            system.stop()
            server_info = system.start(ctx)
            return True

        for case in cases:
            if not restart_if_dead(f"before {case.key}"):
                break
            c0 = time.monotonic()
            crec = run_case(system, server_info, case, plan, ctx.log_dir)
            if "error" in crec and any(not p.alive() for p in system.procs):
                if not restart_if_dead(f"during {case.key}"):
                    rec["cases"].append(crec)
                    break
                failed_attempt = crec
                crec = run_case(system, server_info, case, plan, ctx.log_dir)
                crec["failed_attempt"] = failed_attempt
            rec["cases"].append(crec)
            progress(f"{cls.name}: {case.key}: {_brief(crec)} ({time.monotonic() - c0:.1f}s)")
            # Clients that cannot even connect twice in a row will not in later cases either.
            dead_starts = dead_starts + 1 if crec.get("error") and not crec["runs"] else 0
            if dead_starts >= 2:
                progress(f"{cls.name}: giving up on the remaining cases")
                rec["gave_up"] = "two cases in a row failed before measuring anything"
                break
        for name in experiments if not rec.get("gave_up") else ():
            if not restart_if_dead(f"before the {name} workload"):
                break
            try:
                exp = system.run_experiment(name, server_info, plan, ctx.log_dir, progress)
            except Exception as exc:  # noqa: BLE001 - reported; the rest of the system goes on
                exp = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                progress(f"{cls.name}: {name}: FAILED: {exc}")
            rec.setdefault("experiments", {})[name] = exp
        rec["extra"] = system.extra(ctx) if cases else {}
        failed = [c for c in rec["cases"] if "error" in c]
        failed += [e for e in rec.get("experiments", {}).values() if "error" in e]
        rec["status"] = "ok" if not failed else "partial"
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
        progress(f"{cls.name}: skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - one broken system must not stop the run
        tails = {p.role: p.log_tail() for p in system.procs}
        rec.update(
            status="failed",
            reason=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            log_tails=tails,
        )
        progress(f"{cls.name}: FAILED: {exc}")
    finally:
        system.stop()
        rec["seconds"] = time.monotonic() - t0
    return rec


def _brief(crec: dict[str, Any]) -> str:
    if "error" in crec:
        return "ERROR " + crec["error"].splitlines()[0][:120]
    s = crec["summary"]
    if "rate" not in s:
        return "no data"
    wl = crec["case"]["workload"]
    if wl == "latency":
        return f"p50 {s['p50']['median']:.1f} us, p99 {s['p99']['median']:.1f} us"
    if wl == "goodput":
        return f"{s['goodput_Bps']['median'] / 1e6:.1f} MB/s"
    return f"{s['rate']['median']:.0f} RPC/s, {s['cpu_us_per_rpc']['median']:.1f} us CPU/RPC"


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("grpc", "google.protobuf", "matplotlib", "posix_ipc"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            versions[mod] = str(getattr(m, "__version__", getattr(m, "VERSION", "?")))
        except ImportError:
            versions[mod] = "missing"
    try:
        from bench import sidecars

        versions["envoy"] = sidecars.envoy_version()
    except Exception:  # noqa: BLE001
        versions["envoy"] = "missing"
    return {
        "cpus": len(procs.ALL_CPUS),
        "cpu_model": model,
        "kernel": platform.release(),
        "versions": versions,
        **code_state(),
    }


def code_state() -> dict[str, Any]:
    """HEAD and the tracked files outside bench/ with uncommitted changes (the working
    tree may be shared with other work: the code under test can change during a run)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args],
                cwd=procs.REPO_ROOT,
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [
        line[3:]
        for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
        if len(line) > 3 and not line[3:].startswith("bench/")
    ]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "dirty": dirty[:20]}


def run(
    plan: Plan,
    names: list[str],
    out_dir: Path,
    progress: Any,
    workloads: tuple[str, ...] = ALL_WORKLOADS,
    baseline_rev: str | None = None,
) -> dict[str, Any]:
    """Run the systems ``names``; with ``baseline_rev`` every system that runs mrpc's code
    is paired with its ``NAME@REV`` twin (bench/baseline.py, bench/paired.py)."""
    table = registry()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; known: {', '.join(table)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shm_before = procs.shm_entries()
    started = datetime.now().astimezone()
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "plan": plan.to_json(),
        "workloads": list(workloads),
        "machine": machine_info(),
        "systems": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="mrpc-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            co = None
            if baseline_rev is not None:
                co = stack.enter_context(baseline.checkout(baseline_rev))
                results["baseline"] = _baseline_info(co, progress)
            for name in names:
                cls = table[name]
                if co is not None and cls.has_baseline:
                    from bench import paired

                    twin = baseline.twin(cls, co)
                    mine, theirs = paired.run_pair(
                        cls, twin, plan, out_dir, scratch, progress, workloads
                    )
                    results["systems"][name] = mine
                    results["systems"][twin.name] = theirs
                    results["baseline"]["pairs"].append([name, twin.name])
                else:
                    results["systems"][name] = run_system(
                        cls, plan, out_dir, scratch, progress, workloads
                    )
                _write(out_dir, results)  # keep partial results if a later system hangs
    finally:
        procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
    results["seconds"] = time.monotonic() - t0
    end = code_state()
    results["code_end"] = end
    if end != {k: results["machine"].get(k) for k in end}:
        progress(
            f"warning: the code changed during the run: {results['machine'].get('commit')} "
            f"-> {end['commit']}, uncommitted outside bench/: {end['dirty'] or 'none'}"
        )
    leftovers = sorted(procs.shm_entries() - shm_before)
    results["shm_leftovers"] = leftovers
    if leftovers:
        progress(f"warning: left in /dev/shm after the run: {leftovers}")
    _write(out_dir, results)
    return results


def _baseline_info(co: baseline.Checkout, progress: Any) -> dict[str, Any]:
    """The checkout, and where the working tree's and the baseline's processes import from."""
    info: dict[str, Any] = co.to_json() | {"pairs": [], "imports": {}}
    for label, root in (("working tree", procs.REPO_ROOT), (co.rev, co.root)):
        try:
            info["imports"][label] = baseline.check_tree(root)["files"]
        except Unavailable as exc:
            info["imports"][label] = {"error": str(exc)}
    progress(f"baseline {co.rev} = {co.commit[:12]}, checked out in {co.root}")
    for label, files in info["imports"].items():
        progress(f"  {label}: " + ", ".join(f"{k} from {v}" for k, v in files.items()))
    return info


def _write(out_dir: Path, results: dict[str, Any]) -> None:
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_json_default))
    tmp.replace(out_dir / "results.json")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
