"""The systems under test: one adapter per system, found by name.

An adapter (:class:`System`) starts the server side of its system in separate
processes (servers, daemons, sidecars), says which process ids to account, and
names the *client driver* class the worker process loads to generate load. The
runner knows nothing system-specific beyond this interface.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bench import procs

WORKLOADS = ("latency", "rate", "goodput")  # the case workloads (bench/plan.py)
EXPERIMENTS = ("qos",)  # whole-system experiments a System may implement (run_experiment)


class Unavailable(Exception):
    """The system cannot run here (yet); the message says why and what would fix it."""


@dataclass
class StartContext:
    workdir: Path  # private scratch directory for this system instance
    log_dir: Path
    reply_size: int
    lifetime_s: float  # servers exit by themselves after this long


class System:
    """Base adapter. Subclasses set the class attributes and implement ``start``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    driver: ClassVar[str]  # "module:Class" of the client driver
    workloads: ClassVar[tuple[str, ...]] = WORKLOADS
    experiments: ClassVar[tuple[str, ...]] = ()
    has_bind_time: ClassVar[bool] = False
    # The code tree every process of this system runs: the working tree, or a baseline
    # revision's checkout (bench/baseline.py) for the ``NAME@REV`` twins.
    code_root: ClassVar[Path] = procs.REPO_ROOT
    has_baseline: ClassVar[bool] = False  # runs mrpc's code: --baseline adds a NAME@REV twin

    def __init__(self) -> None:
        self.procs: list[procs.Proc] = []
        self.server_info: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`Unavailable` if this system cannot run here."""

    def start(self, ctx: StartContext) -> dict[str, Any]:
        """Start the server side; return what client drivers need to connect."""
        raise NotImplementedError

    def on_clients_ready(self, client_infos: list[dict[str, Any]]) -> None:
        """Called once per case after every client connected, before measuring."""

    def extra(self, ctx: StartContext) -> dict[str, Any]:
        """System-specific measurements (mrpc: bind time); run after the workloads."""
        return {}

    def run_experiment(
        self, name: str, server_info: dict[str, Any], plan: Any, log_dir: Path, progress: Any
    ) -> dict[str, Any]:
        """Run experiment ``name`` (one of ``self.experiments``) after the cases."""
        raise NotImplementedError(name)

    def stop(self) -> None:
        for p in reversed(self.procs):
            procs.stop(p)
        self.procs.clear()

    # -- accounting -------------------------------------------------------------
    def accounted(self) -> dict[int, str]:
        """pid -> role for every live server-side process, descendants included."""
        out: dict[int, str] = {}
        for p in self.procs:
            for pid in procs.descendants([p.pid, *p.extra_pids]):
                out.setdefault(pid, p.role if pid == p.pid else f"{p.role}+child")
        return out

    # -- helpers ------------------------------------------------------------------
    def start_server(
        self, ctx: StartContext, kind: str, role: str, *args: str, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Run ``python -m bench.serve KIND`` and wait for its ready file."""
        ready = ctx.workdir / f"{role}.ready.json"
        ready.unlink(missing_ok=True)  # a restart must not read the previous instance's file
        argv = procs.python_argv(
            "bench.serve",
            kind,
            "--ready",
            str(ready),
            "--reply-size",
            str(ctx.reply_size),
            "--lifetime",
            str(ctx.lifetime_s),
            *args,
        )
        proc = procs.spawn(role, argv, log_dir=ctx.log_dir, root=self.code_root)
        self.procs.append(proc)
        return procs.wait_for_json(ready, timeout, proc)


def write_ready(path: str, info: dict[str, Any]) -> None:
    """Atomically publish a server's ready file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), **info}, f)
    os.replace(tmp, path)


def watch_parent(lifetime_s: float) -> None:
    """Block until the parent dies or ``lifetime_s`` passes (bounded server lifetime)."""
    keep_serving = serving_while_parent_lives(lifetime_s)
    while keep_serving():
        time.sleep(0.5)


def serving_while_parent_lives(lifetime_s: float) -> Callable[[], bool]:
    """A predicate for server loops: False once the parent is gone or the lifetime is up."""
    parent = os.getppid()
    deadline = time.monotonic() + lifetime_s

    def keep_serving() -> bool:
        return time.monotonic() < deadline and os.getppid() == parent

    return keep_serving


_MODULES = ("bench.systems.floors", "bench.systems.grpc_systems", "bench.systems.mrpc_systems")


def registry() -> dict[str, type[System]]:
    """Every known system adapter by name, in report order."""
    out: dict[str, type[System]] = {}
    for mod_name in _MODULES:
        mod = importlib.import_module(mod_name)
        for cls in getattr(mod, "SYSTEMS", ()):
            out[cls.name] = cls
    order = [
        "mrpc",
        "mrpc-null",
        "mrpc-ratelimit",
        "mrpc-acl",
        "grpc-sync",
        "grpc-aio",
        "grpc-envoy",
        "tcp-floor",
        "shm-floor",
        "socket-stream",
    ]
    return {k: out[k] for k in sorted(out, key=lambda n: order.index(n) if n in order else 99)}


def load_object(spec: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod_name), attr)


def servers() -> dict[str, str]:
    """Server kind -> "module:function" for ``python -m bench.serve``."""
    out: dict[str, str] = {}
    for mod_name in _MODULES:
        mod = importlib.import_module(mod_name)
        out.update(getattr(mod, "SERVERS", {}))
    return out


def python_info() -> str:
    return sys.version.split()[0]
