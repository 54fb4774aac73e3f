"""``mrpcd``: run the daemon."""

from __future__ import annotations

import collections
import faulthandler
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
    from mrpcd.notify import Notifier, Watchdog


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

    SIGHUP (like ``mrpcctl daemon restart``) is a hot restart: a new mrpcd
    process, running the code installed now and the config read anew, takes
    over every app, peer connection and call in flight; this one exits. Under
    systemd (``NOTIFY_SOCKET`` set) it reports READY=1, STATUS=, STOPPING=1 and,
    around a hot restart, RELOADING=1 ... MAINPID=<new pid> READY=1.
    """
    from mrpcd import hotrestart
    from mrpcd.config import load_config
    from mrpcd.daemon import Daemon

    overrides = {"prefix": prefix, "listen": listen, "log_level": log_level}
    try:
        config = load_config(config_path or os.environ.get("MRPC_CONFIG"), overrides=overrides)
    except LocalError as e:
        raise click.ClickException(str(e)) from None
    from mrpcd.logs import configure_logging
    from mrpcd.notify import Notifier

    configure_logging(config.log_level)
    # `kill -USR1 <pid>`: every thread's stack on stderr (the journal), for a daemon
    # that seems stuck; the daemon runs on
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    notifier = Notifier.from_environ()  # unsets NOTIFY_SOCKET: children must not notify
    from mrpcd.gcwatch import freeze_startup_objects

    try:
        daemon = Daemon(config)
        freeze_startup_objects()  # before any app: an app's state must stay collectable
        daemon.start()
    except LocalError as e:
        raise click.ClickException(str(e)) from None
    hotrestart.RUN_OPTIONS.update(config_path=config_path, overrides=overrides)
    daemon.notifier = notifier
    serve(daemon, notifier, config, config_path, overrides)


class Signals:
    """SIGTERM, SIGINT and SIGHUP, recorded by the handler and handled by the main
    loop. A hot restart's new process installs this first thing (the handler it
    inherited belongs to the old process's loop, which no longer runs), so a
    signal that arrives before it serves is handled once it does, not lost."""

    def __init__(self) -> None:
        self.pending: collections.deque[int] = collections.deque()
        self.wake = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)  # handled by serve()'s loop, not in the handler
        self.wake.set()


def serve(
    daemon: Daemon,
    notifier: Notifier,
    config: Config,
    config_path: str | None,
    overrides: dict[str, str | None],
    *,
    takeover: bool = False,
    caught: Signals | None = None,
) -> None:
    """The main thread's life once the daemon serves: signals, systemd, then the drain.
    A hot restart's new process (``takeover``) comes here too, with the signals it
    ``caught`` meanwhile."""
    from mrpcd import hotrestart
    from mrpcd.notify import Watchdog

    hotrestart.RUN_OPTIONS.update(config_path=config_path, overrides=overrides)
    log = logging.getLogger("mrpcd")
    caught = caught or Signals()
    signals, wake = caught.pending, caught.wake
    if takeover:
        notifier.send(f"MAINPID={os.getpid()}", "READY=1", f"STATUS={_status(daemon)}")
    else:
        notifier.ready(_status(daemon))  # the sockets accept and mrpcd.json is written
    watchdog = Watchdog(notifier, lambda timeout: _runtimes_answer(daemon, timeout))
    watchdog.start()
    shown = _status(daemon)
    stopping = False
    while not stopping:
        wake.wait(1.0)
        wake.clear()
        while signals:
            signum = signals.popleft()
            if signum == signal.SIGHUP:
                _hot_restart(daemon, watchdog, signals)
            elif daemon.restarting or daemon.handed_over:
                log.info(
                    "signal %d during a hot restart: passed on to whichever mrpcd serves", signum
                )
                daemon.pending_stop = True
                _pass_on_if_handed_over(daemon)
            else:
                log.info("signal %d: draining in-flight RPCs", signum)
                stopping = True
        if daemon.pending_stop and not daemon.restarting and not daemon.handed_over:
            log.info("the hot restart failed: draining in-flight RPCs for the stop requested")
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


def _hot_restart(daemon: Daemon, watchdog: Watchdog, signals: collections.deque[int]) -> None:
    """SIGHUP: hot restart; on success this process leaves, else it serves on."""
    from libmrpc.status import RpcError

    log = logging.getLogger("mrpcd")
    log.info("SIGHUP: hot restart")
    try:
        daemon.hot_restart()
    except RpcError as e:
        log.error("SIGHUP: %s", e.details())
        return
    watchdog.stop()
    if any(s != signal.SIGHUP for s in signals):  # a stop asked for meanwhile
        daemon.pending_stop = True
    daemon.exit_handed_over()


def _pass_on_if_handed_over(daemon: Daemon) -> None:
    """A stop asked for once the new process took over: this process may be past the
    point where it passes ``pending_stop`` on (``Daemon.exit_handed_over``; it sets
    ``handed_over`` before it looks), so pass it on here too (twice does no harm)."""
    if daemon.handed_over and daemon.successor_pid:
        try:
            os.kill(daemon.successor_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _status(daemon: Daemon) -> str:
    with daemon.apps_lock:
        apps = len(daemon.apps)
    return f"serving {apps} app{'' if apps == 1 else 's'}; peers on {daemon.listen_addr}"


def _runtimes_answer(daemon: Daemon, timeout: float) -> bool:
    """Every runtime thread ran a no-op within ``timeout`` (the watchdog's health check)."""
    return all(rt.call(rt.in_runtime, timeout=timeout) for rt in daemon.runtimes)
