"""``mrpcd``: run the daemon."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from libmrpc.status import LocalError


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
    """Run the daemon in the foreground until SIGTERM/SIGINT (which drain in-flight RPCs)."""
    import os

    from mrpcd.config import load_config
    from mrpcd.daemon import Daemon

    try:
        config = load_config(
            config_path or os.environ.get("MRPC_CONFIG"),
            overrides={"prefix": prefix, "listen": listen, "log_level": log_level},
        )
    except LocalError as e:
        raise click.ClickException(str(e)) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s mrpcd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        daemon = Daemon(config)
        daemon.start()
    except LocalError as e:
        raise click.ClickException(str(e)) from None
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("mrpcd").info("signal %d: draining in-flight RPCs", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        pass
    drained = daemon.drain(config.drain_timeout)
    if not drained:
        logging.getLogger("mrpcd").warning(
            "drain timeout: %d RPCs still in flight", daemon.inflight()
        )
    daemon.stop()
    logging.getLogger("mrpcd").info("stopped")
