"""Real daemons and real application processes for integration tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
APPS = Path(__file__).parent / "apps"


class Daemon:
    def __init__(self, prefix: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.prefix = prefix
        self.proc = proc
        self.log_path = log
        self.state: dict[str, Any] = {}

    @property
    def listen(self) -> str:
        return self.state["listen"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctl(self, *args: str, check: bool = True) -> Any:
        """Run mrpcctl --json against this daemon; returns parsed JSON."""
        r = subprocess.run(
            [sys.executable, "-m", "mrpcd.ctl", "--prefix", str(self.prefix), "--json", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"mrpcctl {' '.join(args)} failed: {r.stderr}")
        return json.loads(r.stdout) if r.returncode == 0 else r

    def apps(self) -> list[dict[str, Any]]:
        return self.ctl("list")["apps"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # its threads' stacks into its log
            time.sleep(0.5)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"mrpcd did not stop within {timeout}s:\n{self.log()[-6000:]}"
            ) from None


class App:
    def __init__(self, proc: subprocess.Popen[str], name: str) -> None:
        self.proc = proc
        self.name = name

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.strip() == "READY":
                return
            if not line and self.proc.poll() is not None:
                raise AssertionError(
                    f"app {self.name} exited with {self.proc.returncode}: "
                    f"{self.proc.stderr.read() if self.proc.stderr else ''}"
                )
        raise AssertionError(f"app {self.name} not ready after {timeout}s")

    def result(self, timeout: float = 120) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert self.proc.returncode == 0 and lines, (
            f"app {self.name} failed ({self.proc.returncode}):\n{err}"
        )
        return json.loads(lines[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, OSError, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()


class Cluster:
    """Daemons ("hosts" on loopback) and app processes, cleaned up at the end."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mrpc-it-", dir="/tmp"))
        self.daemons: list[Daemon] = []
        self.apps: list[App] = []

    def daemon(
        self,
        name: str = "a",
        *extra: str,
        env: dict[str, str] | None = None,
        config: str | None = None,
    ) -> Daemon:
        prefix = self.base / name
        log = self.base / f"{name}.log"
        args = [
            sys.executable,
            "-m",
            "mrpcd",
            "run",
            "--prefix",
            str(prefix),
            "--listen",
            "127.0.0.1:0",
            *extra,
        ]
        if config is not None:
            cfg = self.base / f"{name}.yaml"
            cfg.write_text(config)
            args += ["--config", str(cfg)]
        proc = subprocess.Popen(
            args,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        d = Daemon(prefix, proc, log)
        self.daemons.append(d)
        deadline = time.monotonic() + 20
        state_file = prefix / "mrpcd.json"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"mrpcd exited with {proc.returncode}:\n{d.log()}")
            if state_file.exists():
                try:
                    d.state = json.loads(state_file.read_text())
                except ValueError:
                    d.state = {}
                if d.state.get("pid") == proc.pid:
                    return d
            time.sleep(0.02)
        raise AssertionError(f"mrpcd not ready after 20s:\n{d.log()}")

    def app(self, script: str, *args: str, name: str = "app", wait: bool = True) -> App:
        proc = subprocess.Popen(
            [sys.executable, str(APPS / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        app = App(proc, name)
        self.apps.append(app)
        if wait:
            app.wait_ready()
        return app

    def server(self, daemon: Daemon, *args: str, name: str = "server") -> App:
        return self.app("server_app.py", str(daemon.prefix), "--name", name, *args, name=name)

    def close(self) -> list[str]:
        problems = []
        for app in self.apps:
            app.stop()
        for d in self.daemons:
            if d.proc.poll() is None:
                code = d.stop()
                if code != 0:
                    problems.append(f"mrpcd at {d.prefix} exited with {code}:\n{d.log()[-3000:]}")
            if not stop_successor(d):
                problems.append(f"the hot-restarted mrpcd at {d.prefix} did not stop on SIGTERM")
            if "Traceback" in d.log():
                problems.append(f"mrpcd at {d.prefix} logged a traceback:\n{d.log()[-5000:]}")
        shutil.rmtree(self.base, ignore_errors=True)
        return problems


def stop_successor(d: Daemon, timeout: float = 15) -> bool:
    """A hot restart leaves a process the test did not start (a fork of the daemon's,
    named in ``mrpcd.json``): stop it too. False if it did not stop (it is killed)."""
    try:
        pid = json.loads((d.prefix / "mrpcd.json").read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if pid == d.proc.pid or not mrpcd_running(pid):
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while mrpcd_running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return False
        time.sleep(0.02)
    return True


def mrpcd_running(pid: int) -> bool:
    """``pid`` is a live (not zombie) mrpcd."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status and b"mrpcd" in cmdline


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        problems = c.close()
    assert not problems, "\n".join(problems)


def shm_listing() -> set[str]:
    return set(os.listdir("/dev/shm"))


# --------------------------------------------------------------------------- other Unix users


class User:
    """A real second Unix user (created with useradd, removed at session end)."""

    def __init__(self, name: str) -> None:
        import pwd

        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, pw.pw_uid, pw.pw_gid

    @property
    def python(self) -> list[str]:
        """A Python this user may execute, with the project and its dependencies importable.

        The test interpreter may live under a home directory other users cannot
        enter (pyenv under /root); the system Python of the same minor version
        loads the same site-packages then.
        """
        return [_python_for_others()]

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        import site

        paths = [str(ROOT), *site.getsitepackages()]
        env = {
            **os.environ,
            "HOME": "/",
            "USER": self.name,
            "PYTHONPATH": os.pathsep.join(paths),
            **extra,
        }
        env.pop("XDG_RUNTIME_DIR", None)
        return env

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` as this user (no supplementary groups), cwd the repository."""
        kw.setdefault("cwd", ROOT)
        env = self._env(kw.pop("env", {}))
        return subprocess.Popen(argv, user=self.uid, group=self.gid, extra_groups=[], env=env, **kw)

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        kw.setdefault("cwd", ROOT)
        check = kw.pop("check", False)
        env = self._env(kw.pop("env", {}))
        return subprocess.run(
            argv, user=self.uid, group=self.gid, extra_groups=[], env=env, check=check, **kw
        )


def _python_for_others() -> str:
    """sys.executable if every directory above it is world-searchable, else the
    system python3.X of the same minor version."""
    real = Path(os.path.realpath(sys.executable))
    if all(os.stat(p).st_mode & 0o001 for p in real.parents):
        return sys.executable
    candidate = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if candidate.exists():
        return str(candidate)
    pytest.skip(f"no Python that another user may run ({real} is under a private directory)")


def _ensure_user(name: str) -> User:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip("creating a second Unix user needs root")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
    return User(name)


@pytest.fixture(scope="session")
def other_user() -> User:
    """A second, unprivileged Unix user ("mrpc-eve") for cross-user tests."""
    return _ensure_user("mrpc-eve")


@pytest.fixture(scope="session")
def third_user() -> User:
    """A third unprivileged Unix user ("mrpc-mallory")."""
    return _ensure_user("mrpc-mallory")


def mrpcd_state(d: Daemon) -> dict[str, Any]:
    return json.loads((d.prefix / "mrpcd.json").read_text())


def hot_restart(d: Daemon, *args: str) -> dict[str, Any]:
    """``mrpcctl daemon restart``: checks the old process left and the new one serves."""
    old = mrpcd_state(d)["pid"]
    r = d.ctl("daemon", "restart", *args)
    assert r["old_pid"] == old and r["new_pid"] != old, r
    deadline = time.monotonic() + 10
    while mrpcd_running(old) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mrpcd_running(old), f"the old mrpcd (pid {old}) is still running after the hand-over"
    assert mrpcd_state(d)["pid"] == r["new_pid"]  # the new process rewrote mrpcd.json
    assert d.ctl("status")["pid"] == r["new_pid"]
    return r
