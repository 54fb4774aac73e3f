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
    """Base of mrpc's local-misuse errors (bad config, bad schema, bad engine)."""


class ConfigError(MrpcError):
    """A configuration key or value is wrong; the message names key and file."""


class SchemaError(MrpcError):
    """A schema failed to parse, validate or compile."""


class WireError(MrpcError):
    """Bytes that came from an untrusted party (peer daemon, application) are malformed.

    ``status`` is what the affected RPC fails with.
    """

    def __init__(self, message: str, status: StatusCode = StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.status = status
