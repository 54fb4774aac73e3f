"""The whole mrpc story on one machine: two daemons (two "hosts" on loopback),
an echo server app on host B, a client app on host A.

    python examples/echo.py

Everything runs on embedded defaults (no config file) in a temporary prefix and
is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_daemon(prefix: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mrpcd",
            "run",
            "--prefix",
            str(prefix),
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )
    state = prefix / "mrpcd.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mrpcd exited with {proc.returncode}")
        if state.exists():
            try:
                info = json.loads(state.read_text())
                if info.get("pid") == proc.pid:
                    return proc, info["listen"]
            except ValueError:
                pass
        time.sleep(0.05)
    sys.exit("mrpcd did not start within 30 s")


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="mrpc-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        daemon_a, addr_a = start_daemon(base / "host-a")
        daemon_b, addr_b = start_daemon(base / "host-b")
        procs += [daemon_a, daemon_b]
        print(f"mrpcd host A on {addr_a}, host B on {addr_b}")
        server = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "examples" / "echo_server.py"),
                "--prefix",
                str(base / "host-b"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.insert(0, server)
        assert server.stdout is not None
        print(server.stdout.readline().strip(), "on host B")
        client = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "echo_client.py"),
                addr_b,
                "--prefix",
                str(base / "host-a"),
            ],
            cwd=ROOT,
            check=False,
        )
        subprocess.run(
            [sys.executable, "-m", "mrpcd.ctl", "--prefix", str(base / "host-b"), "list"],
            cwd=ROOT,
            check=False,
        )
        if client.returncode != 0:
            sys.exit(client.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
