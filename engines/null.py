"""The ``null`` policy: forwards every RPC unchanged.

It is the overhead baseline: attaching it costs one engine hop (a queue pop,
a method-filter check and a queue push per item) and nothing else, so
``latency(with null) - latency(without)`` is what any policy pays before it
does its own work.

Config: only the common keys (``enforce``, default ``true``; it has no effect
here because ``null`` never rejects).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mrpcd.engine import PolicyEngine


class NullPolicy(PolicyEngine):
    """Pass everything through (``on_call`` keeps the base class's ``PASS``)."""

    NAME = "null"
    VERSION = 1

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``{"enforce": bool}``; raise ``ConfigError`` on any other key."""
        return cls.common_config(config, ())

    def handle_request(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """``{"op": "stats"}`` -> ``{"engine", "id", "stats"}``; other ops raise ``ValueError``."""
        if cmd.get("op") == "stats":
            return {"engine": self.NAME, "id": self.ctx.engine_id, "stats": self.statistics()}
        return super().handle_request(cmd)


ENGINE = NullPolicy
