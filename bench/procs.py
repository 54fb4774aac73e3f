"""Process plumbing for the benchmarks: spawn, stop, pin, and account.

Every process the bench starts runs in its own session (process group), so one
``killpg`` takes it and anything it forked. A module-level registry remembers
every group still alive; :func:`stop_all` (installed as an ``atexit`` hook and
signal handler by the runner) ends them, by group id, never by name.

CPU time is read per thread from ``/proc/<pid>/task/<tid>/schedstat`` (ns
resolution; ``/proc/<pid>/stat`` only has 10 ms ticks, too coarse for sub-second
windows). A thread that exits inside a window takes its schedstat with it, so
the process total from ``/proc/<pid>/stat`` is kept too and used when it shows
more work than the live threads do. Clients account themselves with
``getrusage``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0))

_live: dict[int, subprocess.Popen[bytes]] = {}


def child_env(extra: dict[str, str] | None = None, root: Path = REPO_ROOT) -> dict[str, str]:
    """Environment for a bench child: the code tree ``root`` (the working tree, or a
    baseline checkout: bench/baseline.py) first on the path, unbuffered output."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(root) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    if extra:
        env.update(extra)
    return env


@dataclass
class Proc:
    """A started process group with a role name used in reports."""

    role: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    extra_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def spawn(
    role: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    cpus: Iterable[int] | None = None,
    stdin_pipe: bool = False,
    stdout_pipe: bool = False,
    env: dict[str, str] | None = None,
    root: Path = REPO_ROOT,
) -> Proc:
    """Start ``argv`` in a new session, in the code tree ``root`` (its cwd and first on its
    path); stderr (and stdout unless piped) go to a log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}.log"
    logf = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    argv = list(argv)
    if cpus is not None:
        # taskset execs the command in place (same pid), so every thread it ever starts
        # inherits the affinity; a preexec_fn is not safe in this threaded parent.
        argv = ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *argv]
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            cwd=root,
            env=env if env is not None else child_env(root=root),
            start_new_session=True,
        )
    finally:
        logf.close()
    _live[popen.pid] = popen
    log.debug("started %s pid %d: %s", role, popen.pid, " ".join(argv))
    return Proc(role, popen, log_path)


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stop(proc: Proc, grace: float = 3.0) -> None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it."""
    popen = proc.popen
    try:
        if popen.poll() is None:
            _killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.1fs; killing", proc.role, popen.pid, grace
                )
        # Children of the group may outlive the leader: always sweep the group.
        _killpg(popen.pid, signal.SIGKILL)
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) did not die after SIGKILL", proc.role, popen.pid)
    finally:
        for stream in (popen.stdin, popen.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        _live.pop(popen.pid, None)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    """End every process group this module started that is still registered."""
    for pid, popen in list(_live.items()):
        _killpg(pid, signal.SIGKILL)
        try:
            popen.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        _live.pop(pid, None)


def wait_for_json(path: Path, timeout: float, proc: Proc | None = None) -> dict:
    """Poll until ``path`` holds a JSON object; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    return data
            except (json.JSONDecodeError, OSError):
                pass
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.role} exited with {proc.popen.returncode} before writing {path}:\n"
                f"{proc.log_tail()}"
            )
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f}s")


# ----------------------------------------------------------------------------- /proc


def descendants(pids: Iterable[int]) -> list[int]:
    """``pids`` plus every live descendant, from one scan of /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        parent[int(entry)] = int(fields[1])
    out = [p for p in pids if p in parent]
    seen = set(out)
    i = 0
    while i < len(out):
        for child, ppid in parent.items():
            if ppid == out[i] and child not in seen:
                seen.add(child)
                out.append(child)
        i += 1
    return out


_TICK = os.sysconf("SC_CLK_TCK")
PROCESS_KEY = -1  # cpu_snapshot key holding the whole process's /proc/<pid>/stat time


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """On-CPU ns of each live thread of ``pid``, plus the process total under
    ``PROCESS_KEY`` (tick resolution, but it includes threads that already exited).
    Empty if the process is gone."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return out
    fields = stat[stat.rfind(")") + 2 :].split()
    out[PROCESS_KEY] = (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _TICK
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def cpu_snapshot(pids: Iterable[int]) -> dict[int, dict[int, int]]:
    return {pid: thread_cpu_ns(pid) for pid in pids}


def cpu_delta_s(
    before: dict[int, dict[int, int]], after: dict[int, dict[int, int]]
) -> dict[int, float]:
    """CPU seconds per pid between two snapshots.

    The per-thread sum is exact for threads alive at the end (threads born in
    between count from 0). When the process total grew by more than two ticks
    beyond it, threads did work and exited inside the window: use the total.
    """
    out: dict[int, float] = {}
    tick_ns = 1_000_000_000 // _TICK
    for pid, threads in after.items():
        old = before.get(pid, {})
        precise = sum(
            max(0, v - old.get(tid, 0)) for tid, v in threads.items() if tid != PROCESS_KEY
        )
        coarse = threads.get(PROCESS_KEY, 0) - old.get(PROCESS_KEY, 0)
        out[pid] = (coarse if coarse - precise > 2 * tick_ns else precise) / 1e9
    return out


def host_busy_s() -> float:
    """CPU seconds all CPUs of the host spent not idle since boot (/proc/stat, 10 ms ticks)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return math.nan
    vals = [int(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    guest = sum(vals[8:10]) if len(vals) > 9 else 0  # already counted in user/nice
    return (sum(vals) - idle - guest) / _TICK


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def set_affinity_all_threads(pids: Iterable[int], cpus: Iterable[int]) -> int:
    """Pin every thread of every pid; threads created later inherit from their creator."""
    cpu_set = set(cpus)
    n = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpu_set)
                n += 1
            except OSError:
                continue
    return n


def set_rt_all_threads(pids: Iterable[int], priority: int) -> int:
    """SCHED_RR at ``priority`` for every thread of every pid (and so for the threads and
    processes they create later, which inherit it); the number of threads set."""
    n = 0
    param = os.sched_param(priority)
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setscheduler(int(tid), os.SCHED_RR, param)
                n += 1
            except OSError:
                continue
    return n


def set_nice_all_threads(pids: Iterable[int], nice: int) -> int:
    """``nice`` for every thread of every pid (inherited by threads created later); the
    number of threads set."""
    n = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                n += 1
            except OSError:
                continue
    return n


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()
