"""Channels: a client's handle on a remote daemon's address, shaped like grpc.Channel."""

from __future__ import annotations

import os
from typing import Self

from libmrpc._session import Session, get_session


class Channel:
    """Calls through the local mrpcd to the daemon at ``target``.

    Cheap: all channels of a process share one session with the local daemon.
    """

    def __init__(
        self, target: str, prefix: str | os.PathLike[str] | None = None, name: str | None = None
    ) -> None:
        self.target = target
        self._prefix = prefix
        self._name = name
        self._sess = get_session(prefix, name)

    def _session(self) -> Session:
        sess = self._sess
        if sess.closed:  # the daemon restarted: register again
            sess = self._sess = get_session(self._prefix, self._name)
        return sess

    def close(self) -> None:
        """Nothing to release per channel; calls in flight still complete."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    target: str, prefix: str | os.PathLike[str] | None = None, *, name: str | None = None
) -> Channel:
    """A channel to the mrpcd listening at ``target`` ("HOST:PORT"), via the local daemon.

    ``prefix`` is the local daemon's prefix (default: ``MRPC_PREFIX``, then the
    daemon's default). Raises ``RpcError(UNAVAILABLE)`` if no local daemon runs.
    """
    return Channel(target, prefix, name)
