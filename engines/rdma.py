"""RDMA transport placeholder: detects RDMA hardware and refuses clearly without it.

The RDMA data path (queue pairs over the shared heaps registered as memory
regions) is not implemented yet. On a host without an RDMA device or without
pyverbs, ``transport: rdma`` fails at daemon start with a message that says
what is missing, instead of an import error or a silent fallback to TCP.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from libmrpc.status import LocalError
from mrpcd.engine import EngineContext, IngressEngine, TransportEngine

SYSFS = "/sys/class/infiniband"


def rdma_devices(sysfs: str = SYSFS) -> list[str]:
    """Names of RDMA devices the kernel knows (empty when there are none)."""
    try:
        return sorted(os.listdir(sysfs))
    except OSError:
        return []


def unavailable_reason(sysfs: str = SYSFS) -> str | None:
    """Why RDMA cannot be used here, or None when it could be."""
    devices = rdma_devices(sysfs)
    if not devices:
        return (
            f"no RDMA device on this host ({sysfs} is empty or missing); "
            f"use transport: tcp (the default)"
        )
    try:
        import pyverbs  # noqa: F401
    except ImportError:
        return (
            f"RDMA devices {', '.join(devices)} found but pyverbs is not installed; "
            f"pip install 'mrpc[rdma]' (needs rdma-core), or use transport: tcp"
        )
    return "the RDMA transport is not implemented in this version of mrpc; use transport: tcp"


class RdmaTransport(TransportEngine):
    NAME = "rdma"
    VERSION = 0

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        raise LocalError(f"transport rdma: {unavailable_reason()}")

    def do_work(self) -> int:  # pragma: no cover - never constructed
        return 0


class RdmaIngress(IngressEngine):
    NAME = "rdma-ingress"
    VERSION = 0

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        raise LocalError(f"transport rdma: {unavailable_reason()}")

    def do_work(self) -> int:  # pragma: no cover - never constructed
        return 0


ENGINE = RdmaTransport
INGRESS = RdmaIngress
