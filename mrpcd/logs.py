"""The daemon's log format: plain lines on a terminal or file, sd-daemon(3) lines for journald.

When systemd connects stderr to the journal it sets ``JOURNAL_STREAM`` to that
stream's ``device:inode``; if it matches our stderr, each line is written as
``<N>logger: message`` with N the syslog priority of the record's level (so
``journalctl -p warning`` works) and no timestamp or pid, which journald records
itself. Every line of a multi-line record (a traceback) carries the prefix.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

PLAIN_FORMAT = "%(asctime)s mrpcd[%(process)d] %(levelname)s %(name)s: %(message)s"

# syslog priorities (sd-daemon(3)): err 3, warning 4, info 6, debug 7; critical 2
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>name: message``, the prefix repeated on every line of the record."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True if ``stream`` (stderr) is the journal stream named by ``JOURNAL_STREAM``."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure_logging(level: str) -> bool:
    """Log to stderr at ``level``; journald format if stderr is the journal. True if it is."""
    journal = stderr_is_journal()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return journal
