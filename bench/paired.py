"""A system and its baseline twin (``mrpc`` and ``mrpc@REV``), measured window by window.

Both systems are started side by side. For each case, both start their clients;
then each run measures the working tree's window and right after it the
baseline's (A B A B ...), so slow drifts of the machine's load hit both alike and
the per-run ratios (bench/compare.py) pair windows taken seconds apart. While one
side measures, the other side's processes are idle (clients wait on stdin, the
daemons' runtimes sleep). Experiments (qos) and bind time run for the working
tree only, after the paired cases, with the twin stopped.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from bench import procs
from bench.plan import REPLY_SIZE, Plan
from bench.runner import MAX_RESTARTS, CaseError, CaseRun, _brief, _role_rss, run_system
from bench.systems import StartContext, System, Unavailable


class _Side:
    """One system of the pair: its adapter, record, and restarts."""

    def __init__(self, cls: type[System], out_dir: Path, scratch: Path, progress: Any) -> None:
        self.cls, self.system, self.progress = cls, cls(), progress
        self.rec: dict[str, Any] = {"name": cls.name, "summary": cls.summary, "cases": []}
        safe = cls.name.replace("/", "_")
        self.ctx = StartContext(
            workdir=scratch / safe,
            log_dir=out_dir / "logs" / safe,
            reply_size=REPLY_SIZE,
            lifetime_s=900.0,
        )
        self.server_info: dict[str, Any] = {}
        self.restarts: list[str] = []
        self.live = False
        self.t0 = time.monotonic()

    def check(self) -> bool:
        try:
            self.system.check()
        except Unavailable as exc:
            # a twin that cannot run REV's code (or would run other code) is a failure
            status = "skipped" if self.cls.code_root == procs.REPO_ROOT else "failed"
            self.rec.update(status=status, reason=str(exc))
            self.progress(f"{self.cls.name}: {status}: {exc}")
            return False
        check = getattr(self.system, "import_check", None)
        if check is not None:
            self.rec["import_check"] = check
        return True

    def start(self) -> bool:
        self.ctx.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            self.server_info = self.system.start(self.ctx)
        except Exception as exc:  # noqa: BLE001 - one broken system must not stop the run
            self.fail_start(exc)
            return False
        self.rec["server_info"] = self.server_info
        time.sleep(0.3)  # let the servers settle before the idle snapshot
        self.rec["idle_rss_kib"] = _role_rss(self.system.accounted())
        self.progress(f"{self.cls.name}: started in {time.monotonic() - t0:.1f}s")
        self.live = True
        return True

    def fail_start(self, exc: BaseException) -> None:
        self.rec.update(
            status="failed",
            reason=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            log_tails={p.role: p.log_tail() for p in self.system.procs},
        )
        self.progress(f"{self.cls.name}: FAILED: {exc}")
        self.system.stop()
        self.live = False

    def restart_if_dead(self, when: str) -> None:
        """Restart once if a server-side process died; out of the pair after that."""
        dead = [f"{p.role} (exit {p.popen.returncode})" for p in self.system.procs if not p.alive()]
        if not dead:
            return
        note = f"{when}: {', '.join(dead)} had exited; restarted the system"
        self.progress(f"{self.cls.name}: {note}")
        self.restarts.append(note)
        self.rec["restarts"] = self.restarts
        self.system.stop()
        if len(self.restarts) > MAX_RESTARTS:
            self.rec["gave_up"] = "server-side processes kept dying"
            self.live = False
            return
        self.start()

    def finish(self, experiments: list[str], plan: Plan) -> dict[str, Any]:
        try:
            if self.live:
                for name in experiments:
                    try:
                        exp = self.system.run_experiment(
                            name, self.server_info, plan, self.ctx.log_dir, self.progress
                        )
                    except Exception as exc:  # noqa: BLE001 - reported; the rest goes on
                        exp = {"error": f"{type(exc).__name__}: {exc}"}
                        exp["traceback"] = traceback.format_exc()
                        self.progress(f"{self.cls.name}: {name}: FAILED: {exc}")
                    self.rec.setdefault("experiments", {})[name] = exp
                self.rec["extra"] = self.system.extra(self.ctx) if self.rec["cases"] else {}
        except Exception as exc:  # noqa: BLE001
            self.rec["extra"] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.system.stop()
        if "status" not in self.rec:
            failed = [c for c in self.rec["cases"] if "error" in c]
            failed += [e for e in self.rec.get("experiments", {}).values() if "error" in e]
            self.rec["status"] = "ok" if not failed and not self.rec.get("gave_up") else "partial"
        self.rec["seconds"] = time.monotonic() - self.t0
        return self.rec


def run_pair(
    cls: type[System],
    twin: type[System],
    plan: Plan,
    out_dir: Path,
    scratch: Path,
    progress: Any,
    workloads: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``cls`` and its baseline ``twin`` case by case, windows alternating."""
    cases = plan.cases([w for w in cls.workloads if w in workloads])
    experiments = [e for e in cls.experiments if e in workloads]
    work, base = _Side(cls, out_dir, scratch, progress), _Side(twin, out_dir, scratch, progress)
    if not cases:  # nothing to pair: the working tree alone (its experiments, if any)
        base.rec.update(status="skipped", reason=f"runs none of {', '.join(workloads)}")
        return run_system(cls, plan, out_dir, scratch, progress, workloads), base.rec
    if not work.check():
        base.rec.update(status="skipped", reason=f"{cls.name} cannot run here")
        return work.rec, base.rec
    if not base.check():
        return run_system(cls, plan, out_dir, scratch, progress, workloads), base.rec
    try:
        if work.start():
            base.start()
        sides = [s for s in (work, base) if s.live]
        for case in cases if work.live else ():
            for s in sides:
                s.restart_if_dead(f"before {case.key}")
            sides = [s for s in sides if s.live]
            if not sides:
                break
            c0 = time.monotonic()
            records = _paired_case(sides, case, plan)
            for s, crec in zip(sides, records, strict=True):
                s.rec["cases"].append(crec)
            briefs = "; ".join(f"{s.cls.name} {_brief(r)}" for s, r in zip(sides, records))
            progress(f"{case.key}: {briefs} ({time.monotonic() - c0:.1f}s)")
    except Exception as exc:  # noqa: BLE001 - one broken pair must not stop the run
        for s in (work, base):
            if s.live:
                s.fail_start(exc)
    finally:
        base_rec = base.finish([], plan)
    return work.finish(experiments, plan), base_rec


def _paired_case(sides: list[_Side], case: Any, plan: Plan) -> list[dict[str, Any]]:
    crs = [CaseRun(s.system, s.server_info, case, plan, s.ctx.log_dir) for s in sides]
    try:
        for cr in crs:
            try:
                cr.open()
            except CaseError as exc:
                cr.fail(exc)
        for run in range(plan.runs):
            for cr in crs:  # working tree, then baseline: A B A B ...
                if cr.failed:
                    continue
                try:
                    cr.measure(run)
                except CaseError as exc:
                    cr.fail(exc)
    finally:
        records = [cr.close() for cr in crs]
    return records
