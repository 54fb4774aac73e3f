"""Errors of the wire layer: the bytes an untrusted party sent are malformed.

A :class:`WireError` is never a local misuse (that is
:class:`~libmrpc.status.LocalError`): it names what was wrong with the bytes and
carries the gRPC status the affected RPC fails with, so the I/O shell that caught it
answers that RPC (or closes that connection) and nobody else is affected.
"""

from __future__ import annotations

from libmrpc.status import MrpcError, StatusCode

__all__ = ["TooBig", "WireError"]


class WireError(MrpcError):
    """Bytes that came from an untrusted party (peer daemon, application) are malformed.

    ``status`` is what the affected RPC fails with.
    """

    def __init__(self, message: str, status: StatusCode = StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.status = status


class TooBig(WireError):
    """The marshalled message would exceed the size limit it was given."""

    def __init__(self, message: str, at_least: int) -> None:
        super().__init__(message, StatusCode.RESOURCE_EXHAUSTED)
        self.at_least = at_least  # bytes the message needs, at least
