"""``mrpcd``: run the daemon."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

import click

from libmrpc.status import LocalError

if TYPE_CHECKING:
    from mrpcd.config import Config
    from mrpcd.daemon import Daemon
    from mrpcd.notify import Notifier


@click.group()
def main() -> None:
    """mrpcd: RPC as a managed system service."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config file (see deploy/mrpcd.yaml); MRPC_CONFIG also works.",
)
@click.option("--prefix", default=None, help="Directory for sockets, cache and mrpcd.json.")
@click.option(
    "--listen", default=None, help="TCP HOST:PORT for peer daemons (port 0 = any free port)."
)
@click.option("--log-level", default=None, help="debug, info, warning or error.")
def run(
    config_path: str | None, prefix: str | None, listen: str | None, log_level: str | None
) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT (which drain in-flight RPCs).

    Under systemd (``NOTIFY_SOCKET`` set) it reports READY=1, STATUS=, STOPPING=1 and,
    around a SIGHUP, RELOADING=1 ... READY=1. SIGHUP re-reads the config file for
    ``log_level`` only; other changed keys take effect when mrpcd restarts.
    """
    from mrpcd.config import load_config
    from mrpcd.daemon import Daemon

    try:
        config = load_config(
            config_path or os.environ.get("MRPC_CONFIG"),
            overrides={"prefix": prefix, "listen": listen, "log_level": log_level},
        )
    except LocalError as e:
        raise click.ClickException(str(e)) from None
    from mrpcd.logs import configure_logging
    from mrpcd.notify import Notifier, Watchdog

    configure_logging(config.log_level)
    notifier = Notifier.from_environ()  # unsets NOTIFY_SOCKET: children must not notify
    try:
        daemon = Daemon(config)
        daemon.start()
    except LocalError as e:
        raise click.ClickException(str(e)) from None
    log = logging.getLogger("mrpcd")
    signals: collections.deque[int] = collections.deque()
    wake = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)  # handled by the loop below, not in the handler
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    notifier.ready(_status(daemon))  # the sockets accept and mrpcd.json is written
    watchdog = Watchdog(notifier, lambda timeout: _runtimes_answer(daemon, timeout))
    watchdog.start()
    shown = _status(daemon)
    overrides = {"prefix": prefix, "listen": listen, "log_level": log_level}
    stopping = False
    while not stopping:
        wake.wait(1.0)
        wake.clear()
        while signals:
            signum = signals.popleft()
            if signum == signal.SIGHUP:
                config = _reload(config_path, overrides, config, notifier, daemon)
            else:
                log.info("signal %d: draining in-flight RPCs", signum)
                stopping = True
        now = _status(daemon)
        if now != shown and not stopping:
            notifier.status(now)
            shown = now
    notifier.stopping(f"draining {daemon.inflight()} in-flight RPCs")
    watchdog.stop()
    drained = daemon.drain(config.drain_timeout)
    if not drained:
        logging.getLogger("mrpcd").warning(
            "drain timeout: %d RPCs still in flight", daemon.inflight()
        )
    daemon.stop()
    logging.getLogger("mrpcd").info("stopped")


def _status(daemon: Daemon) -> str:
    with daemon.apps_lock:
        apps = len(daemon.apps)
    return f"serving {apps} app{'' if apps == 1 else 's'}; peers on {daemon.listen_addr}"


def _runtimes_answer(daemon: Daemon, timeout: float) -> bool:
    """Every runtime thread ran a no-op within ``timeout`` (the watchdog's health check)."""
    return all(rt.call(rt.in_runtime, timeout=timeout) for rt in daemon.runtimes)


def _reload(
    path: str | None,
    overrides: dict[str, str | None],
    config: Config,
    notifier: Notifier,
    daemon: Daemon,
) -> Config:
    """SIGHUP: re-read the config file and apply its ``log_level``; return the config in force.

    Nothing else is reloaded in place: keys that changed are named in a warning and
    take effect when mrpcd restarts. A file that no longer loads changes nothing.
    """
    from mrpcd.config import load_config

    log = logging.getLogger("mrpcd")
    notifier.reloading("reloading log_level")
    try:
        new = load_config(path or os.environ.get("MRPC_CONFIG"), overrides=overrides)
    except LocalError as e:
        log.error("SIGHUP: the config did not load, nothing changed: %s", e)
        notifier.ready(_status(daemon))
        return config
    log.info("SIGHUP: log_level %s -> %s", config.log_level, new.log_level)
    logging.getLogger().setLevel(new.log_level.upper())
    changed = [
        f.name
        for f in dataclasses.fields(new)
        if f.name != "log_level" and getattr(new, f.name) != getattr(config, f.name)
    ]
    if changed:
        log.warning(
            "SIGHUP: %s changed but only log_level is reloaded in place; restart mrpcd "
            "(systemctl restart mrpcd) to apply the rest",
            ", ".join(changed),
        )
    notifier.ready(_status(daemon))
    return dataclasses.replace(config, log_level=new.log_level)
