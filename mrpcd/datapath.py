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

The transport's ``rx_in`` is the app's inbox: the one deque other threads
append to (``AppState.deliver``: inbound calls from the ingress, reclaims from
a connection's flush), never re-pointed by a splice, so nothing handed over
can land in a deque that left the chain. Each splice tells the frontend
whether a policy that reads message content is in the chain
(``FrontendEngine.need_private_images``) and moves each engine along its
lifecycle (``Engine.lifecycle``).

All mutations run on the datapath's runtime thread (``Runtime.call``), between
two ``do_work`` rounds, so no engine ever sees a half-spliced chain.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, cast

from mrpcd.engine import Engine, FrontendEngine, Rpc, TransportEngine
from mrpcd.registry import engine_source

log = logging.getLogger(__name__)


class DatapathError(Exception):
    pass


class Datapath:
    def __init__(
        self,
        app: str,
        frontend: FrontendEngine,
        transport: TransportEngine,
        inbox: deque[Rpc] | None = None,
    ) -> None:
        if not isinstance(frontend, FrontendEngine) or not isinstance(transport, TransportEngine):
            raise DatapathError(
                f"a datapath is a FrontendEngine and a TransportEngine, got "
                f"{type(frontend).__name__} and {type(transport).__name__}"
            )
        self.app = app
        self.engines: list[Engine] = [frontend, transport]
        self.state = "active"  # active | upgrading | closed
        self.content = False  # a policy reads message content (kept by insert/remove/replace)
        a, b = frontend, transport
        tx: deque[Rpc] = deque()
        rx: deque[Rpc] = deque()
        a.bind(deque(), tx, rx, deque())  # the frontend's tx_in / rx_out are unused ends
        # the transport's tx_out is an unused end; its rx_in is the app's inbox
        b.bind(tx, deque(), inbox if inbox is not None else deque(), rx)
        a.lifecycle("attach")
        b.lifecycle("attach")
        a.need_private_images(False)

    @property
    def frontend(self) -> FrontendEngine:
        return cast(FrontendEngine, self.engines[0])  # checked in __init__ and replace

    @property
    def transport(self) -> TransportEngine:
        return cast(TransportEngine, self.engines[-1])

    @property
    def policies(self) -> list[Engine]:
        return self.engines[1:-1]

    def deliver_local(self, rpc: Rpc) -> None:
        """On the owning runtime: put ``rpc`` where the transport hands received items
        on (what it would do with the inbox next round, without the round)."""
        self.transport.rx_out.append(rpc)

    def reads_content(self) -> bool:
        return self.content

    def _update(self) -> None:
        content = any(e.READS_CONTENT for e in self.policies)
        if content != self.content:
            self.content = content
            self.frontend.need_private_images(content)

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
        if not engine.ATTACHABLE:
            raise DatapathError(f"engine {engine.NAME!r} is always on; it is not a policy")
        engine.lifecycle("attach")
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
        engine.lifecycle("detach")
        self._update()
        return moved

    def role(self, old: Engine) -> type[Engine]:
        """The class an engine taking ``old``'s place must be (its slot's role)."""
        index = self.engines.index(old)
        if index == 0:
            return FrontendEngine
        return TransportEngine if index == len(self.engines) - 1 else Engine

    def can_take(self, old: Engine, cls: type[Engine]) -> str | None:
        """Why an engine of class ``cls`` cannot take ``old``'s place (None: it can)."""
        if old not in self.engines:
            return f"engine {old.ctx.engine_id} is not in the datapath of {self.app!r}"
        role = self.role(old)
        if not issubclass(cls, role) or cls.ATTACHABLE != old.ATTACHABLE:
            kind = role.__name__ if role is not Engine else "PolicyEngine (ATTACHABLE)"
            return (
                f"{cls.NAME!r} ({cls.__name__}) cannot take the place of {old.NAME!r}: not a {kind}"
            )
        return None

    def replace(self, old: Engine, new: Engine) -> None:
        """Put ``new`` in ``old``'s place on the same deques (live upgrade)."""
        self.engines.index(old)  # ValueError for an engine of another datapath
        reason = self.can_take(old, type(new))
        if reason is not None:
            raise DatapathError(reason)
        old.lifecycle("upgrade")
        self.commit_upgrade(old, new)

    # The upgrade of one engine in three steps, for a caller that may roll back
    # (mrpcd/upgrade.py): begin (decompose) -> commit (the successor runs) or
    # rollback (the old engine resumes with the state it handed over).

    def begin_upgrade(self, old: Engine) -> dict[str, Any]:
        """``old`` hands its state over (``decompose``); it stays in place, decomposed."""
        if self.state != "active":
            raise DatapathError(f"can't upgrade in {self.app!r}: datapath is {self.state}")
        if old not in self.engines:
            raise DatapathError(
                f"engine {old.ctx.engine_id} is not in the datapath of {self.app!r}"
            )
        old.lifecycle("upgrade")
        try:
            return old.decompose()
        except BaseException:
            old.lifecycle("rollback")
            raise

    def commit_upgrade(self, old: Engine, new: Engine) -> None:
        """``new`` (restored from ``old``'s state) takes ``old``'s deques and place."""
        reason = self.can_take(old, type(new))
        if reason is not None:
            raise DatapathError(reason)
        index = self.engines.index(old)
        new.lifecycle("attach")
        new.bind(old.tx_in, old.tx_out, old.rx_in, old.rx_out)
        self.engines[index] = new
        old.lifecycle("retire")
        if index == 0:  # a new frontend learns what the chain needs
            self.frontend.need_private_images(self.content)
        self._update()

    def rollback_upgrade(self, old: Engine, state: dict[str, Any]) -> None:
        """The successor was refused: ``old`` takes its own state back and resumes."""
        old.load_state(state, old.VERSION)
        old.lifecycle("rollback")

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
                    "module": engine_source(type(e)),
                    "side": e.ctx.side.value,
                    "method": e.ctx.method,
                    "config": e.config,
                    "queued": len(e.tx_in) + len(e.rx_in),
                }
            )
        return out
