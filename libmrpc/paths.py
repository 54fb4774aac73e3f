"""Where a daemon lives: its prefix directory and the files in it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


def default_prefix(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/mrpc`` if that directory exists and is writable, else
    ``/tmp/mrpc-<uid>``. The daemon must check who owns the directory it finds there."""
    xdg = (os.environ if env is None else env).get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg) and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg) / "mrpc"
    return Path(f"/tmp/mrpc-{os.getuid()}")


def resolve_prefix(prefix: str | os.PathLike[str] | None) -> Path:
    """``prefix``, else ``MRPC_PREFIX``, else the daemon's default prefix."""
    if prefix:
        return Path(prefix)
    env = os.environ.get("MRPC_PREFIX")
    return Path(env) if env else default_prefix()


def daemon_state(prefix: Path) -> dict[str, object]:
    """The daemon's ``mrpcd.json`` (empty if the daemon has not written it)."""
    try:
        data = json.loads((prefix / "mrpcd.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def app_socket_path(prefix: Path) -> str:
    path = daemon_state(prefix).get("app_socket")
    return str(path) if isinstance(path, str) else str(prefix / "app.sock")
