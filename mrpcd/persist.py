"""The record of the operator's policy changes, kept under the prefix across restarts.

How this works: ``PREFIX/policies.json`` (mode 0600, the daemon's) holds the
policies an operator attached at runtime, so a restarted daemon puts them back:

- ``kind: app`` — an attachment to running applications, recorded by the
  application's *name* (an attach by pid is recorded under the name of the app
  that pid was; pids do not survive a restart). Its config follows
  ``mrpcctl policy set``; ``mrpcctl policy detach`` removes it. After a restart
  it is a standing rule for that name: every app registering with the name gets it.
- ``kind: rule`` — a standing rule made with ``--future`` (``--app NAME`` or
  ``--all``), with the config it was attached with; ``policy detach --rule``
  removes it. A ``--future`` rule for a pid is not recorded.

Not recorded: ``--transient`` attachments and the config file's ``policies:``
(those come from the config at every start). ``engines`` maps an engine name to
the module an upgrade put in place (:meth:`PolicyRecord.record_engine_module`).

Every change rewrites the whole file atomically and durably (temp file, fsync,
rename, fsync of the directory: :func:`mrpcd.prefix.write_file`), so a crash
leaves the old or the new record. A file that cannot be read or parsed at start
is moved aside to ``policies.json.bad-<UTC time>`` with a warning and the daemon
starts without it; a malformed entry is dropped with a warning naming it.
Whether an entry's engine and config are still good is for the caller to judge
(:class:`mrpcd.policy.PolicyManager` skips those with a warning and keeps them).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mrpcd.prefix import open_file, write_file

log = logging.getLogger(__name__)

RECORD_NAME = "policies.json"
FORMAT = 1
MAX_RECORD_BYTES = 16 * 1024 * 1024  # far above any real record; a bigger file is moved aside
KINDS = ("app", "rule")


@dataclass
class Entry:
    """One recorded policy; ``skipped`` (not saved) says why it was not applied at this start."""

    id: str
    kind: str
    app: str
    engine: str
    side: str
    method: str | None
    config: dict[str, Any]
    attached_by_pid: int | None = None
    skipped: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["skipped"]
        return d

    def describe(self) -> str:
        what = "standing rule" if self.kind == "rule" else "attachment"
        return f"{self.id} ({what}: {self.engine} on app {self.app!r}, {self.side} side)"


class Malformed(Exception):
    """Part of the record file is not what this daemon writes; the message says what."""


def _entry(raw: object, where: str) -> Entry:
    """An entry from the file's JSON; :class:`Malformed` saying what is wrong."""
    if not isinstance(raw, dict):
        raise Malformed(f"{where}: expected a mapping, got {type(raw).__name__}")
    checks: dict[str, tuple[type, bool]] = {
        "id": (str, False),
        "kind": (str, False),
        "app": (str, False),
        "engine": (str, False),
        "side": (str, False),
        "method": (str, True),
        "config": (dict, False),
        "attached_by_pid": (int, True),
    }
    unknown = set(raw) - set(checks)
    if unknown:
        raise Malformed(f"{where}: unknown keys {sorted(unknown)}")
    for key, (typ, nullable) in checks.items():
        value = raw.get(key)
        if value is None and nullable:
            continue
        if not isinstance(value, typ) or isinstance(value, bool) or value == "":
            raise Malformed(f"{where}: {key}: expected {typ.__name__}, got {value!r}")
    if raw["kind"] not in KINDS:
        raise Malformed(f"{where}: kind: expected one of {KINDS}, got {raw['kind']!r}")
    return Entry(**raw)


class PolicyRecord:
    """``PREFIX/policies.json``; thread-safe. With ``enabled=False`` nothing is read or written."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.entries: dict[str, Entry] = {}
        self.engine_modules: dict[str, str] = {}
        self._next = 1
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start

    def load(self) -> list[Entry]:
        """Read the record (see the module doc); never raises for what the file holds."""
        if not self.enabled:
            return []
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a write cut by a crash
            log.info("removing %s, left by a write that a crash interrupted", stale)
            stale.unlink(missing_ok=True)
        try:
            fd = open_file(self.path, os.O_RDONLY, 0o600)
        except FileNotFoundError:
            return []
        except OSError as e:  # a symlink, a directory, another owner: not ours to trust
            self._move_aside(f"cannot be opened: {e}")
            return []
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_RECORD_BYTES + 1)
            if len(data) > MAX_RECORD_BYTES:
                raise Malformed(f"larger than {MAX_RECORD_BYTES} bytes")
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise Malformed(f"not a format-{FORMAT} policy record")
            entries, engines = doc.get("policies", []), doc.get("engines", {})
            if not isinstance(entries, list) or not isinstance(engines, dict):
                raise Malformed("'policies' must be a list and 'engines' a mapping")
        except (OSError, ValueError, Malformed) as e:  # JSONDecodeError and UnicodeDecodeError too
            self._move_aside(str(e))
            return []
        dropped = 0
        for i, raw in enumerate(entries):
            try:
                entry = _entry(raw, f"policies[{i}]")
                if entry.id in self.entries:
                    raise Malformed(f"policies[{i}]: duplicate id {entry.id!r}")
            except Malformed as e:
                log.warning("%s: dropping a malformed entry: %s", self.path, e)
                dropped += 1
                continue
            self.entries[entry.id] = entry
            if entry.id[1:].isdigit():
                self._next = max(self._next, int(entry.id[1:]) + 1)
        for name, module in engines.items():
            if isinstance(name, str) and isinstance(module, str) and module:
                self.engine_modules[name] = module
            else:
                log.warning("%s: dropping malformed engine entry %r: %r", self.path, name, module)
        log.info(
            "%s: %d recorded policies%s",
            self.path,
            len(self.entries),
            f" ({dropped} malformed, dropped)" if dropped else "",
        )
        return list(self.entries.values())

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        bad = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        try:
            os.rename(self.path, bad)
        except OSError as e:
            log.warning(
                "%s is unreadable (%s) and cannot be moved aside (%s); starting without "
                "recorded policies; it will be replaced at the next policy change",
                self.path,
                why,
                e.strerror,
            )
            return
        log.warning(
            "%s is unreadable (%s); moved it to %s and started without recorded policies; "
            "inspect it and attach its policies again if needed",
            self.path,
            why,
            bad.name,
        )

    # ------------------------------------------------------------------ changes

    def add(
        self,
        kind: str,
        app: str,
        engine: str,
        side: str,
        method: str | None,
        config: dict[str, Any],
        attached_by_pid: int | None = None,
    ) -> Entry:
        """Record a policy and save; OSError if the file cannot be written (then not recorded)."""
        with self._lock:
            entry = Entry(
                f"p{self._next}", kind, app, engine, side, method, dict(config), attached_by_pid
            )
            self.entries[entry.id] = entry
            try:
                self._save()
            except OSError:
                del self.entries[entry.id]
                raise
            self._next += 1
        return entry

    def update_config(self, entry_id: str, config: dict[str, Any]) -> bool:
        """Replace an entry's config and save; False if there is no such entry. OSError."""
        with self._lock:
            entry = self.entries.get(entry_id)
            if entry is None:
                return False
            entry.config = dict(config)
            self._save()
        return True

    def remove(self, entry_id: str) -> Entry | None:
        """Forget an entry and save; the entry, or None if there was none. OSError."""
        with self._lock:
            entry = self.entries.pop(entry_id, None)
            if entry is not None:
                self._save()
        return entry

    def record_engine_module(self, name: str, module: str) -> None:
        """Hook for ``mrpcctl engine upgrade``: engine ``name`` now runs from ``module``.

        At the next start the daemon loads ``name`` from ``module`` (see
        :meth:`mrpcd.policy.PolicyManager.record_engine_module`). OSError."""
        with self._lock:
            self.engine_modules[name] = module
            self._save()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "enabled": self.enabled,
                "path": str(self.path),
                "policies": [dict(e.to_json(), skipped=e.skipped) for e in self.entries.values()],
                "engines": dict(self.engine_modules),
            }

    def _save(self) -> None:
        if not self.enabled:
            return
        doc = {
            "format": FORMAT,
            "policies": [e.to_json() for e in self.entries.values()],
            "engines": self.engine_modules,
        }
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        write_file(self.path, data, 0o600, durable=True)
