"""What an RPC carries between the always-on engines (frontend and transport).

An :class:`~mrpcd.engine.core.Rpc`'s ``_state`` is one of these: where its
message lives (the app's send heap, a marshalled image, the receive heap or
daemon-private memory) and where its answer goes. Policies never read them;
they use ``Rpc.view()``, which :func:`make_private` can make safe after the fact.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from libmrpc.status import StatusCode
from mrpcd.engine.core import Rpc, RpcKind

if TYPE_CHECKING:
    from mrpcd.engine.ports import AppPort


@dataclass(eq=False)
class Binding:
    """A schema an application bound: its slot number in that app and its module."""

    slot: int
    module: ModuleType
    schema_hash: str
    services: tuple[str, ...]


@dataclass(eq=False)
class ConnSpec:
    """An application's connection to a remote daemon for one schema."""

    conn_id: int
    host: str
    port: int
    slot: int

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def key(self) -> tuple[str, int, int]:
        """The target: an app's connections with the same key share one TCP connection."""
        return self.host, self.port, self.slot


@dataclass(eq=False, slots=True)
class Landed:
    """A received message image: in the app's receive heap or in private memory."""

    heap_off: int | None  # block offset in the app's receive heap
    length: int
    private: bytearray | memoryview | None = None


@dataclass(eq=False, slots=True)
class TxCall:
    """State of an outbound CALL: where its request lives in the app's send heap."""

    conn: ConnSpec
    binding: Binding
    rec_off: int
    image: bytearray | None = None  # a private copy, made when a content policy is attached
    wire: tuple[bytearray, list[memoryview]] | None = None  # the marshalled image (head, segments)


@dataclass(eq=False, slots=True)
class RxCall:
    """State of an inbound CALL for a server app: who serves it and where the answer goes.

    ``origin`` belongs to the transport that received the call (its connection);
    only that transport's runtime touches it. ``port`` is the server app.
    """

    origin: Any
    wire_id: int
    binding: Binding
    landed: Landed | None
    port: AppPort | None = None


@dataclass(eq=False, slots=True)
class TxReply:
    """State of a server app's REPLY on its way out: the call it answers, its image."""

    call: RxCall
    rec_off: int  # 0 for an error reply
    image: bytearray | None = None
    wire: tuple[bytearray, list[memoryview]] | None = None


def make_private(rpc: Rpc) -> bool:
    """Give ``rpc`` a daemon-private image and ``view()`` if it has none.

    A call marshalled before a content policy was attached (and held meanwhile,
    e.g. by a delay-mode ratelimit or qos) still has zero-copy segments of the
    app's send heap; copy them out now, so the bytes a policy checks are the
    bytes sent. True when ``rpc.view()`` is now private; False when ``rpc``
    carries no message (an error reply) or is not marshalled yet.
    """
    if rpc._view is not None:
        return True
    st = rpc._state
    wire = getattr(st, "wire", None)
    if wire is None or rpc.method is None or rpc.status is not StatusCode.OK:
        return False
    if isinstance(st, TxCall) and rpc.kind is RpcKind.CALL:
        binding, type_name = st.binding, rpc.method.request
    elif isinstance(st, TxReply) and rpc.kind is RpcKind.REPLY:
        binding, type_name = st.call.binding, rpc.method.response
    else:
        return False
    head, segs = wire
    image = bytearray(head)
    for seg in segs:
        image += seg
    cls = binding.module.MESSAGES[type_name]
    st.image, st.wire = image, (image, [])
    rpc._view = lambda: cls._from_image(memoryview(image).toreadonly(), 0, st)
    return True
