"""gRPC status codes and the one error type callers catch.

The numbering and meaning follow https://grpc.github.io/grpc/core/md_doc_statuscodes.html
so code written against grpcio reads the same against mrpc.
"""

from __future__ import annotations

import enum


class StatusCode(enum.IntEnum):
    OK = 0  # not an error
    CANCELLED = 1  # the caller cancelled the call
    UNKNOWN = 2  # the handler raised an exception that was not an RpcError
    INVALID_ARGUMENT = 3  # the request is malformed (bad reference, bad field value)
    DEADLINE_EXCEEDED = 4  # the deadline passed before a reply arrived
    NOT_FOUND = 5  # a named entity (app, engine, schema) does not exist
    ALREADY_EXISTS = 6  # the entity being created exists already
    PERMISSION_DENIED = 7  # a policy (ACL) refused the call
    RESOURCE_EXHAUSTED = 8  # rate limit, heap full, ring full, message too large
    FAILED_PRECONDITION = 9  # the system is not in a state to run it (schema mismatch)
    ABORTED = 10  # the operation was aborted (upgrade rolled back)
    OUT_OF_RANGE = 11  # a value is past a valid range
    UNIMPLEMENTED = 12  # the method is not implemented by the server
    INTERNAL = 13  # an invariant broke inside mrpc (a bug: please report)
    UNAVAILABLE = 14  # daemon, peer or server application unreachable or draining
    DATA_LOSS = 15  # unrecoverable data loss or corruption
    UNAUTHENTICATED = 16  # the caller has no valid credentials


class RpcError(Exception):
    """The error every failed call raises; shaped like ``grpc.RpcError``.

    ``code()`` is a :class:`StatusCode`, ``details()`` a message that says what
    happened and what to do about it.
    """

    def __init__(self, code: StatusCode | int, details: str = "") -> None:
        self._code = StatusCode(code)
        self._details = details
        super().__init__(f"{self._code.name}: {details}")

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The server's initial metadata (``context.send_initial_metadata`` before the
        handler failed); empty when none, or when the error did not come from the server."""
        return getattr(self, "_initial", ())

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The server's trailing metadata sent with this error (empty when none)."""
        return getattr(self, "_trailing", ())

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        return (type(self), (int(self._code), self._details))


class MrpcError(Exception):
    """Base of the errors mrpc raises outside an RPC's status (those are :class:`RpcError`).

    Catch a subclass, which says who is at fault:

    - :class:`LocalError`: misuse on this host (a bad config key, schema, engine
      module, prefix); the fix is local, in a file or a command line.
    - :class:`~libmrpc.wire.errors.WireError`: bytes from an untrusted party (a peer
      daemon, an application) are malformed; it carries the gRPC status the affected
      RPC fails with, and costs only the offender.
    """


class LocalError(MrpcError):
    """Local misuse: the configuration, a schema, an engine module or a directory on
    this host is wrong. The message names the value and says what to change."""


class ConfigError(LocalError):
    """A configuration key or value is wrong; the message names key and file."""


class SchemaError(LocalError):
    """A schema failed to parse, validate or compile."""
