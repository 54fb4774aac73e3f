"""Load a ``.proto`` file at run time: the in-process equivalent of ``mrpc-protoc``.

``load_proto`` reads the file and its imports, and on a cache hit (same texts,
layout and generator versions) imports the cached generated module without
running protoc; otherwise it compiles the texts and generates, caches and imports
the module. The module's contents are exactly what ``mrpc-protoc`` writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from libmrpc._codegen import load_cached, load_module
from libmrpc._schema import compile_texts, read_proto


def load_proto(
    path: str | os.PathLike[str],
    include_dirs: tuple[str | os.PathLike[str], ...] | list[str | os.PathLike[str]] = (),
    cache_dir: str | os.PathLike[str] | None = None,
) -> ModuleType:
    """The generated module of ``path`` (see :func:`libmrpc._codegen.generate_source`).

    Raises :class:`~libmrpc.status.SchemaError` for unreadable or invalid schemas.
    """
    texts = read_proto(path, tuple(include_dirs))
    cache = Path(cache_dir) if cache_dir is not None else None
    mod = load_cached(texts, cache)
    if mod is not None:
        return mod
    return load_module(compile_texts(texts), cache)
