"""libmrpc: the application side of mrpc.

echo = libmrpc.load_proto("schemas/echo.proto")
channel = libmrpc.connect("127.0.0.1:5150")
reply = echo.EchoStub(channel).Echo(echo.EchoRequest(payload=b"hi"), timeout=1.0)
"""

from typing import Any

from libmrpc.status import RpcError, StatusCode

__all__ = [
    "Channel",
    "RpcError",
    "Server",
    "ServicerContext",
    "StatusCode",
    "connect",
    "load_proto",
]


def __getattr__(name: str) -> Any:  # lazy: importing libmrpc stays cheap (no protoc, no session)
    if name in ("connect", "Channel"):
        from libmrpc import channel

        return getattr(channel, name)
    if name in ("Server", "ServicerContext"):
        from libmrpc import server

        return getattr(server, name)
    if name == "load_proto":
        from libmrpc.loader import load_proto

        return load_proto
    raise AttributeError(f"module 'libmrpc' has no attribute {name!r}")
