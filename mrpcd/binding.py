"""Dynamic binding: schema texts in, a loaded marshalling module out.

Three levels: an in-memory table (another app with the same schema binds in
microseconds), the on-disk cache under the prefix (a generated module keyed by
the hash of schema texts, layout version and generator version: milliseconds,
no protoc), and a cold compile with protoc from grpcio-tools.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# Generated modules import these; importing them with the daemon keeps that
# one-time cost (tens of ms without bytecode caches) out of the first bind.
import libmrpc.marshal_rt
import libmrpc.message
import libmrpc.stubs  # noqa: F401
from libmrpc.codegen import load_cached, load_module
from libmrpc.schema import cache_key_for, compile_texts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BindResult:
    module: ModuleType
    schema_hash: str
    how: str  # "memory" | "disk" | "compiled"
    seconds: float


class BindingCache:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._by_key: dict[str, ModuleType] = {}
        self.by_hash: dict[str, ModuleType] = {}
        self._lock = threading.Lock()
        self.stats = {"memory": 0, "disk": 0, "compiled": 0}

    def bind(self, texts: dict[str, str]) -> BindResult:
        """Return the module for ``texts``; raises SchemaError for a bad schema."""
        t0 = time.perf_counter()
        key = cache_key_for(texts)
        with self._lock:
            module = self._by_key.get(key)
            how = "memory"
            if module is None:
                module = load_cached(texts, self.cache_dir)
                how = "disk"
                if module is None:
                    module = load_module(compile_texts(texts), self.cache_dir)
                    how = "compiled"
                self._by_key[key] = module
                self.by_hash[module.SCHEMA_HASH] = module
            self.stats[how] += 1
        took = time.perf_counter() - t0
        log.info("bound schema %s (%s) in %.2f ms", module.SCHEMA_HASH, how, took * 1e3)
        return BindResult(module, module.SCHEMA_HASH, how, took)
