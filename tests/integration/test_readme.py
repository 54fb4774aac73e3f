"""README.md's snippets run as shown, against real daemons.

Every ``python`` and ``bash`` block of README.md runs here unless a
``<!-- not-run: REASON -->`` line precedes it (tests/markdown_blocks.py):

- the first block (the two quick-start commands): its main job, examples/echo.py,
  runs with this interpreter (the test command is the one running now);
- the ``<!-- run-as: server -->`` block runs as the echo server app on daemon B;
  the other python blocks run after it, in order, as one client script on
  daemon A, with the placeholder address ``10.0.0.2:5150`` replaced by B's;
- ``mrpcd run ...`` lines start a daemon (default prefix moved to a temporary
  ``RUNTIME_DIRECTORY``, port 0), which must become ready and exit 0 on SIGTERM;
- ``mrpcctl ...`` lines run against a daemon serving an app named ``kv``.

``DIR`` in a command is replaced by a prefix directory.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import ROOT, Cluster, Daemon
from tests.markdown_blocks import Block, blocks

README = ROOT / "README.md"
PLACEHOLDER = "10.0.0.2:5150"  # the README's remote daemon address


def _readme_blocks() -> tuple[Block, list[Block], list[Block], list[str]]:
    """(quick start, server blocks, client blocks, shell lines) of README.md."""
    found = [b for b in blocks(README) if b.marker != "not-run"]
    quick, rest = found[0], found[1:]
    servers = [b for b in rest if b.marker == "run-as" and b.marker_arg == "server"]
    clients = [b for b in rest if b.lang == "python" and b.marker is None]
    lines = [
        ln.strip()
        for b in rest
        if b.lang in ("bash", "sh", "shell")
        for ln in b.code.splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    return quick, servers, clients, lines


def _tool(name: str) -> list[str]:
    """The console script ``name`` next to this interpreter, as pip installed it."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"mrpcd": "mrpcd", "mrpcctl": "mrpcd.ctl"}[name]]


def _argv(line: str, prefix: Path) -> list[str]:
    words = shlex.split(line, comments=True)
    return _tool(words[0]) + [str(prefix) if w == "DIR" else w for w in words[1:]]


def test_readme_quick_start_runs_the_echo_example() -> None:
    quick, *_ = _readme_blocks()
    main_job = quick.code.splitlines()[0].split("&&")[-1].split()
    assert main_job == [".venv/bin/python", "examples/echo.py"], main_job
    r = subprocess.run(
        [sys.executable, *main_job[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    print(r.stdout)
    assert r.returncode == 0, f"examples/echo.py failed:\n{r.stdout}\n{r.stderr}"
    assert "asyncio: 64/64 concurrent calls answered correctly" in r.stdout
    assert "latency over" in r.stdout and "serves echo.Echo" in r.stdout


def _wait_served(daemon: Daemon, service: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = daemon.ctl("services")["services"]
        if any(r["service"] == service and r["served_by"] for r in rows):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the README's server exited:\n{proc.stderr.read()}")  # type: ignore[union-attr]
        time.sleep(0.1)
    raise AssertionError(f"the README's server did not serve {service} within 30 s")


def test_readme_python_snippets_against_real_daemons(cluster: Cluster) -> None:
    _quick, servers, clients, _lines = _readme_blocks()
    assert len(servers) == 1 and len(clients) >= 2, (len(servers), len(clients))
    a, b = cluster.daemon("a"), cluster.daemon("b")
    server_py = cluster.base / "readme_server.py"
    server_py.write_text(servers[0].code)
    server = subprocess.Popen(
        [sys.executable, str(server_py)],
        cwd=ROOT,
        env={**os.environ, "MRPC_PREFIX": str(b.prefix)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_served(b, "echo.Echo", server)
        script = "".join(f"# --- {blk.where()}\n{blk.code}" for blk in clients)
        assert PLACEHOLDER in script
        client_py = cluster.base / "readme_client.py"
        client_py.write_text(script.replace(PLACEHOLDER, b.listen))
        r = subprocess.run(
            [sys.executable, str(client_py)],
            cwd=ROOT,
            env={**os.environ, "MRPC_PREFIX": str(a.prefix)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        print(r.stdout)
        assert r.returncode == 0, f"README client snippets failed:\n{script}\n{r.stderr}"
        assert "b'hi'" in r.stdout
        # the 1 µs deadline passes in the client, or (when the daemon is quicker) in mrpcd's
        # frontend, whose error names the call: "DEADLINE_EXCEEDED call N to /echo.Echo/Echo"
        assert re.search(
            r"^DEADLINE_EXCEEDED (call \d+ to )?/echo\.Echo/Echo", r.stdout, re.MULTILINE
        )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_readme_mrpcctl_lines_run_as_shown(cluster: Cluster) -> None:
    *_, lines = _readme_blocks()
    ctl = [ln for ln in lines if ln.startswith("mrpcctl ")]
    assert len(ctl) >= 8, ctl
    b = cluster.daemon("b")
    cluster.server(b, name="kv")
    for line in ctl:
        r = subprocess.run(
            _argv(line, b.prefix), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode == 0, f"`{line}` failed ({r.returncode}):\n{r.stdout}{r.stderr}"
        print(f"$ {line}\n{r.stdout}")
    engines = [e["engine"] for app in b.apps() for e in app["datapath"]]
    assert "acl" in engines and "ratelimit" not in engines, engines  # attached; detached


def test_readme_mrpcd_run_lines_start_and_stop(cluster: Cluster) -> None:
    *_, lines = _readme_blocks()
    runs = [ln for ln in lines if ln.startswith("mrpcd run")]
    others = [ln for ln in lines if not ln.startswith(("mrpcd run", "mrpcctl "))]
    assert runs and not others, f"README shell lines this test cannot run: {others}"
    for i, line in enumerate(runs):
        base = cluster.base / f"run{i}"
        runtime_dir = base / "runtime"
        runtime_dir.mkdir(parents=True, mode=0o700)
        argv = _argv(line, base / "prefix")
        prefix = Path(argv[argv.index("--prefix") + 1]) if "--prefix" in argv else runtime_dir
        log = base / "mrpcd.log"
        env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime_dir), "MRPC_LISTEN": "127.0.0.1:0"}
        with log.open("w") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not (prefix / "mrpcd.json").exists():
                assert proc.poll() is None, f"`{line}` exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"`{line}` not ready:\n{log.read_text()}"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, f"`{line}` did not exit 0:\n{log.read_text()}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "Traceback" not in log.read_text(), log.read_text()
        print(f"$ {line}: ready in {prefix}, exited 0 on SIGTERM")
