"""Datapaths: the chain of engines serving one application.

How this works: a datapath is ``[frontend, policy..., transport]``. Between two
neighbours ``a`` (app side) and ``b`` (network side) sit two deques: ``a.tx_out
is b.tx_in`` and ``b.rx_out is a.rx_in``. Attaching a policy ``p`` between them
gives ``p`` the *existing* deques as its outputs and new empty deques as its
inputs, and re-points ``a.tx_out``/``b.rx_out`` at those inputs — items already
queued keep flowing, nothing is copied or lost. Detaching reverses that: the
engine flushes what it holds into its outputs, whatever still waits in its
inputs is moved to its outputs in order, and the neighbours are re-pointed.
Upgrading binds the new engine to exactly the old engine's deques.

All mutations run on the datapath's runtime thread (``Runtime.call``), between
two ``do_work`` rounds, so no engine ever sees a half-spliced chain.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from libmrpc.status import StatusCode
from mrpcd.engine import Engine, Rpc, RpcKind

log = logging.getLogger(__name__)


class DatapathError(Exception):
    pass


class Datapath:
    def __init__(self, app: str, frontend: Engine, transport: Engine) -> None:
        self.app = app
        self.engines: list[Engine] = [frontend, transport]
        self.state = "active"  # active | upgrading | closed
        self.content = False  # a policy reads message content (kept by insert/remove/replace)
        a, b = frontend, transport
        tx: deque[Rpc] = deque()
        rx: deque[Rpc] = deque()
        a.bind(deque(), tx, rx, deque())  # the frontend's tx_in / rx_out are unused ends
        b.bind(tx, deque(), deque(), rx)  # the transport's tx_out / rx_in are unused ends

    @property
    def frontend(self) -> Engine:
        return self.engines[0]

    @property
    def transport(self) -> Engine:
        return self.engines[-1]

    @property
    def policies(self) -> list[Engine]:
        return self.engines[1:-1]

    def reads_content(self) -> bool:
        return self.content

    def _update(self) -> None:
        self.content = any(e.READS_CONTENT for e in self.policies)

    def insert(self, engine: Engine, index: int | None = None) -> None:
        """Splice ``engine`` in before position ``index`` (default: just before the transport)."""
        if self.state != "active":
            raise DatapathError(f"can't attach to {self.app!r}: datapath is {self.state}")
        if index is None:
            index = len(self.engines) - 1
        if not 1 <= index <= len(self.engines) - 1:
            raise DatapathError(f"position {index} is outside the policy chain of {self.app!r}")
        a, b = self.engines[index - 1], self.engines[index]
        new_tx: deque[Rpc] = deque()
        new_rx: deque[Rpc] = deque()
        engine.bind(new_tx, a.tx_out, new_rx, b.rx_out)
        a.tx_out = new_tx
        b.rx_out = new_rx
        self.engines.insert(index, engine)
        self._update()

    def remove(self, engine: Engine) -> int:
        """Unsplice a policy; returns how many items it handed on."""
        if engine not in self.policies:
            raise DatapathError(f"engine is not a policy of {self.app!r}")
        index = self.engines.index(engine)
        a, b = self.engines[index - 1], self.engines[index + 1]
        moved = engine.flush()
        while engine.tx_in:
            engine.tx_out.append(engine.tx_in.popleft())
            moved += 1
        while engine.rx_in:
            engine.rx_out.append(engine.rx_in.popleft())
            moved += 1
        # order: whatever the engine queued downstream already is ahead of the
        # items that were still waiting for it, which is the order they came in
        a.tx_out = engine.tx_out
        b.rx_out = engine.rx_out
        self.engines.pop(index)
        self._update()
        return moved

    def replace(self, old: Engine, new: Engine) -> None:
        """Put ``new`` in ``old``'s place on the same deques (live upgrade)."""
        index = self.engines.index(old)
        new.bind(old.tx_in, old.tx_out, old.rx_in, old.rx_out)
        self.engines[index] = new
        self._update()

    def drain_all(self) -> list[Rpc]:
        """Take every item out of every deque and engine (teardown)."""
        items: list[Rpc] = []
        for engine in self.policies:
            try:
                engine.flush()
            except Exception:
                log.exception("flush of %s failed during teardown", engine.NAME)
        seen: set[int] = set()
        for engine in self.engines:
            for q in (engine.tx_in, engine.tx_out, engine.rx_in, engine.rx_out):
                if id(q) in seen:
                    continue
                seen.add(id(q))
                items.extend(q)
                q.clear()
        return items

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for e in self.engines:
            out.append(
                {
                    "id": e.ctx.engine_id,
                    "engine": e.NAME,
                    "version": e.VERSION,
                    "side": e.ctx.side.value,
                    "method": e.ctx.method,
                    "config": e.config,
                    "queued": len(e.tx_in) + len(e.rx_in),
                }
            )
        return out


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
    if rpc.kind is RpcKind.CALL:
        binding, type_name = getattr(st, "binding", None), rpc.method.request
    else:
        binding, type_name = (
            getattr(getattr(st, "call", None), "binding", None),
            rpc.method.response,
        )
    if binding is None:
        return False
    head, segs = wire
    image = bytearray(head)
    for seg in segs:
        image += seg
    cls = binding.module.MESSAGES[type_name]
    st.image, st.wire = image, (image, [])
    rpc._view = lambda: cls._from_image(memoryview(image).toreadonly(), 0, st)
    return True
