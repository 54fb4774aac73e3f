"""libmrpc: the application side of mrpc."""

from libmrpc.status import RpcError, StatusCode

__all__ = ["RpcError", "StatusCode"]
