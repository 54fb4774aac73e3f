"""The binding cache on disk: compiled schemas that only this daemon's user could have written.

How this works: each entry is one file ``<cache key>.bin`` in the cache
directory (checked by :func:`mrpcd.prefix.ensure_dir`: ours, mode 0700)::

    b"MRPCBIN1" | HMAC-SHA256(secret, rest) | rest
    rest = len(header) (4 bytes, big endian) | header (JSON) | payload

The secret is 32 random bytes in ``.secret`` (mode 0600), made on first use.
An entry is used only if the file is a regular file (not followed through a
symlink) owned by the daemon's euid, not writable by group or others, its HMAC
matches (so it was written by a process that could read the secret: this
daemon's user) and its header names the key asked for and this Python's
bytecode version. Anything else is deleted, logged and compiled again. Entries
are written under a temporary name with mode 0600 and renamed. The cache keeps
at most ``max_entries`` entries and ``max_bytes`` bytes, deleting the least
recently used first; files it does not know (older formats, stray temporaries)
are removed when the daemon starts.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import logging
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from pathlib import Path

from mrpcd.compiler import Compiled
from mrpcd.prefix import PrefixError, owner_name, write_file

log = logging.getLogger(__name__)

MAGIC = b"MRPCBIN1"
_ENTRY = re.compile(r"[0-9a-f]{64}\.bin")
_PYTHON = importlib.util.MAGIC_NUMBER.hex()


def _read_own(path: Path, limit: int) -> bytes:
    """Bytes of a regular file of ours closed to others' writes; OSError/PrefixError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PrefixError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise PrefixError(
                f"{path} belongs to {owner_name(st.st_uid)}, not to the daemon's "
                f"{owner_name(os.geteuid())}"
            )
        if st.st_mode & 0o022:
            raise PrefixError(
                f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
            )
        if st.st_size > limit:
            raise PrefixError(f"{path} is {st.st_size} bytes, more than {limit}")
        return f.read(limit + 1)


class DiskCache:
    def __init__(self, directory: Path, max_entries: int, max_bytes: int) -> None:
        self.dir = directory
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._secret = self._load_secret()
        self._index: OrderedDict[str, int] = (
            OrderedDict()
        )  # key -> file size, least recently used first
        self._scan()

    def _load_secret(self) -> bytes:
        path = self.dir / ".secret"
        try:
            data = _read_own(path, 64)
            if len(data) == 32 and stat.S_IMODE(os.lstat(path).st_mode) == 0o600:
                return data
            log.warning(
                "cache secret %s is malformed or readable by others; making a new one", path
            )
        except FileNotFoundError:
            pass
        except (OSError, PrefixError) as e:
            log.warning("not using cache secret: %s; making a new one", e)
        self._unlink(path)
        data = secrets.token_bytes(32)
        write_file(path, data, 0o600)
        return data

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for entry in os.scandir(self.dir):
            if entry.name == ".secret":
                continue
            st = entry.stat(follow_symlinks=False)
            if _ENTRY.fullmatch(entry.name) and stat.S_ISREG(st.st_mode):
                found.append((st.st_mtime, entry.name[:-4], st.st_size))
            else:
                log.info("removing unknown file %s from the binding cache", entry.path)
                self._unlink(Path(entry.path))
        for _mtime, key, size in sorted(found):
            self._index[key] = size
        self._evict()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"disk_entries": len(self._index), "disk_bytes": sum(self._index.values())}

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.bin"

    def load(self, key: str) -> Compiled | None:
        """The verified entry for ``key``, or None (a bad entry is deleted and logged)."""
        path = self._path(key)
        with self._lock:
            if key not in self._index:
                return None
        try:
            data = _read_own(path, max(self.max_bytes, 1 << 20))
            compiled = self._decode(key, data)
        except FileNotFoundError:
            compiled = None
        except (OSError, PrefixError, ValueError) as e:
            log.warning("not using binding cache file %s: %s; compiling the schema again", path, e)
            compiled = None
        if compiled is None:
            self.discard(key)
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        try:
            os.utime(path)
        except OSError:
            pass
        return compiled

    def _decode(self, key: str, data: bytes) -> Compiled | None:
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 36:
            raise ValueError("not a binding cache entry")
        mac, rest = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
        if not hmac.compare_digest(mac, hmac.new(self._secret, rest, hashlib.sha256).digest()):
            raise ValueError(
                "its keyed hash does not match (not written by this daemon, or altered)"
            )
        n = int.from_bytes(rest[:4], "big")
        header = json.loads(rest[4 : 4 + n])
        if header.get("python") != _PYTHON:
            log.info(
                "binding cache entry %s is for another Python version; compiling again", key[:16]
            )
            return None
        if header.get("cache_key") != key:
            raise ValueError("it is the entry of another schema")
        return Compiled(key, str(header["schema_hash"]), rest[4 + n :])

    def store(self, compiled: Compiled) -> None:
        """Write an entry (mode 0600, atomically), then delete the least recently used over the limits."""
        header = json.dumps(
            {
                "cache_key": compiled.cache_key,
                "schema_hash": compiled.schema_hash,
                "python": _PYTHON,
            }
        ).encode()
        rest = len(header).to_bytes(4, "big") + header + compiled.payload
        data = MAGIC + hmac.new(self._secret, rest, hashlib.sha256).digest() + rest
        if self.max_entries == 0 or len(data) > self.max_bytes:
            return
        try:
            write_file(self._path(compiled.cache_key), data, 0o600)
        except OSError as e:
            log.warning(
                "cannot write binding cache entry %s: %s", self._path(compiled.cache_key), e
            )
            return
        with self._lock:
            self._index[compiled.cache_key] = len(data)
            self._index.move_to_end(compiled.cache_key)
        self._evict()

    def discard(self, key: str) -> None:
        with self._lock:
            self._index.pop(key, None)
        self._unlink(self._path(key))

    def _evict(self) -> None:
        while True:
            with self._lock:
                if (
                    len(self._index) <= self.max_entries
                    and sum(self._index.values()) <= self.max_bytes
                ):
                    return
                key, _ = self._index.popitem(last=False)
            log.info("binding cache full: deleting the least recently used entry %s", key[:16])
            self._unlink(self._path(key))

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                return  # a directory someone made in our cache: leave it, it is never read
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot delete %s: %s", path, e)
