"""Dynamic binding: schema texts in, a loaded marshalling module out.

Three levels: modules in memory (another app with the same schema binds in
microseconds), the on-disk cache (:mod:`mrpcd.bindcache`: compiled code checked
for owner, mode and keyed hash; milliseconds, no protoc), and a cold compile in
a child process with its own time and memory limits (:mod:`mrpcd.compiler`),
so the daemon's threads never run protoc or compile a large module.

Bounds: a bind's texts are at most ``schema.max_bytes``; at most
``schema.compile_jobs`` compiles run at once (concurrent binds of one schema
share one compile). A loaded module stays in memory while an app holds it (its
bindings refer to it; the table here holds it weakly) and, after that, only
while it is among the ``schema.keep_unused`` most recently bound. Modules are
not put in ``sys.modules``, so nothing else keeps them alive.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# Generated modules import these; importing them with the daemon keeps that
# one-time cost (tens of ms without bytecode caches) out of the first bind.
import libmrpc._message
import libmrpc.stubs
import libmrpc.wire.marshal  # noqa: F401
from libmrpc._codegen import exec_codes
from libmrpc._schema import cache_key_for, check_file_names
from libmrpc.status import RpcError, StatusCode
from mrpcd.bindcache import DiskCache
from mrpcd.compiler import Compiled, compile_in_child, load_payload
from mrpcd.config import SchemaConfig
from mrpcd.prefix import ensure_dir

log = logging.getLogger(__name__)

MAX_CODE_SIZE = 1 << 30  # decompressed code of one schema; the compile memory limit binds first


@dataclass(frozen=True)
class BindResult:
    module: ModuleType
    schema_hash: str
    how: str  # "memory" | "disk" | "compiled"
    seconds: float


class _Pending:
    """One load or compile in progress; binds of the same texts wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.module: ModuleType | None = None
        self.error: BaseException | None = None


def check_texts(texts: Any, max_bytes: int) -> dict[str, str]:
    """``texts`` if it is ``{file name: text}`` within ``max_bytes``; else RpcError/SchemaError."""
    if (
        not isinstance(texts, dict)
        or not texts
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in texts.items())
    ):
        raise RpcError(
            StatusCode.INVALID_ARGUMENT, "binding a schema needs texts: {file name: proto source}"
        )
    size = sum(
        len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
        for k, v in texts.items()
    )
    if size > max_bytes:
        raise RpcError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"schema of {size} bytes ({len(texts)} files) exceeds schema.max_bytes ({max_bytes} "
            f"bytes); split it or ask the operator to raise schema.max_bytes",
        )
    check_file_names(texts)
    return texts


class BindingCache:
    def __init__(self, cache_dir: Path, limits: SchemaConfig) -> None:
        self.cache_dir = cache_dir
        self.limits = limits
        ensure_dir(cache_dir, 0o700, "cache directory")
        self.disk = DiskCache(cache_dir, limits.cache_max_entries, limits.cache_max_bytes)
        self._live: weakref.WeakValueDictionary[str, ModuleType] = weakref.WeakValueDictionary()
        self._recent: OrderedDict[str, ModuleType] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._jobs = threading.BoundedSemaphore(limits.compile_jobs)
        self.counts = {"memory": 0, "disk": 0, "compiled": 0, "failed": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Counters of binds by outcome, and the sizes of the memory and disk tables.

        Collects garbage first: a module is freed when the last app holding it is,
        and apps' state is reclaimed by the cycle collector.
        """
        gc.collect()
        with self._lock:
            return dict(
                self.counts,
                loaded=len(self._live),
                kept_unused=len(self._recent),
                **self.disk.stats(),
            )

    def bind(self, texts: Any) -> BindResult:
        """Return the module for ``texts``.

        Raises SchemaError (-> INVALID_ARGUMENT) for a bad schema and RpcError for
        bad texts, a schema over a limit (RESOURCE_EXHAUSTED) or a compiler failure.
        """
        t0 = time.perf_counter()
        texts = check_texts(texts, self.limits.max_bytes)
        key = cache_key_for(texts)
        with self._lock:
            module = self._live.get(key)
            pending = None if module is not None else self._pending.get(key)
            owner = module is None and pending is None
            if owner:
                pending = self._pending[key] = _Pending()
        how = "memory"
        if module is None:
            assert pending is not None
            if owner:
                module, how = self._load_or_compile(key, texts, pending)
            else:
                pending.done.wait()
                if pending.error is not None:
                    raise pending.error
                module = pending.module
        assert module is not None
        with self._lock:
            self._recent[key] = module
            self._recent.move_to_end(key)
            while len(self._recent) > self.limits.keep_unused:
                self._recent.popitem(last=False)
            self.counts[how] += 1
        took = time.perf_counter() - t0
        log.log(
            logging.DEBUG if how == "memory" else logging.INFO,
            "bound schema %s (%s) in %.2f ms",
            module.SCHEMA_HASH,
            how,
            took * 1e3,
        )
        return BindResult(module, module.SCHEMA_HASH, how, took)

    def _load_or_compile(
        self, key: str, texts: dict[str, str], pending: _Pending
    ) -> tuple[ModuleType, str]:
        try:
            how = "disk"
            module = self._from_disk(key, texts)
            if module is None:
                how = "compiled"
                if len(self._live) > len(self._recent):
                    gc.collect()  # free modules of apps that left before holding more (compiles are rare)
                with self._jobs:
                    compiled = compile_in_child(
                        texts,
                        timeout=self.limits.compile_timeout,
                        memory=self.limits.compile_memory,
                    )
                if compiled.cache_key != key:
                    raise RpcError(StatusCode.INTERNAL, "schema compiler answered for other texts")
                module = self._load(compiled, texts)
                self.disk.store(compiled)
            pending.module = module
            with self._lock:
                self._live[key] = module
            return module, how
        except BaseException as e:
            pending.error = e
            with self._lock:
                self.counts["failed"] += 1
            raise
        finally:
            with self._lock:
                self._pending.pop(key, None)
            pending.done.set()

    def _from_disk(self, key: str, texts: dict[str, str]) -> ModuleType | None:
        compiled = self.disk.load(key)
        if compiled is None:
            return None
        try:
            return self._load(compiled, texts)
        except Exception as e:  # noqa: BLE001 - whatever a bad entry raises, compile it again
            log.warning("ignoring cached schema %s: %s; compiling it again", key[:16], e)
            self.disk.discard(key)
            return None

    def _load(self, compiled: Compiled, texts: dict[str, str]) -> ModuleType:
        codes = load_payload(compiled.payload, MAX_CODE_SIZE)
        module = exec_codes(
            codes, compiled.cache_key, f"<mrpc schema {compiled.cache_key[:16]}>", register=False
        )
        if (
            getattr(module, "CACHE_KEY", None) != compiled.cache_key
            or getattr(module, "TEXTS", None) != texts
        ):
            raise ValueError("compiled schema is for other texts")
        return module
