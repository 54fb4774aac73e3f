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
        r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--prefix", str(self.prefix), "--json", *args],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
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
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"mrpcd did not stop within {timeout}s:\n{self.log()[-3000:]}") from None


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
                raise AssertionError(f"app {self.name} exited with {self.proc.returncode}: "
                                     f"{self.proc.stderr.read() if self.proc.stderr else ''}")
        raise AssertionError(f"app {self.name} not ready after {timeout}s")

    def result(self, timeout: float = 120) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert self.proc.returncode == 0 and lines, f"app {self.name} failed ({self.proc.returncode}):\n{err}"
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

    def daemon(self, name: str = "a", *extra: str, env: dict[str, str] | None = None,
               config: str | None = None) -> Daemon:
        prefix = self.base / name
        log = self.base / f"{name}.log"
        args = [sys.executable, "-m", "mrpcd", "run", "--prefix", str(prefix), "--listen", "127.0.0.1:0", *extra]
        if config is not None:
            cfg = self.base / f"{name}.yaml"
            cfg.write_text(config)
            args += ["--config", str(cfg)]
        proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
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
        proc = subprocess.Popen([sys.executable, str(APPS / script), *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
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
            if "Traceback" in d.log():
                problems.append(f"mrpcd at {d.prefix} logged a traceback:\n{d.log()[-5000:]}")
        shutil.rmtree(self.base, ignore_errors=True)
        return problems


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
