"""The policy record under the prefix: atomic and durable writes, a corrupt file, bad entries."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mrpcd.persist import PolicyRecord
from mrpcd.policy import PolicyManager
from mrpcd.registry import EngineRegistry


def add(rec: PolicyRecord, app: str = "kv", engine: str = "ratelimit", **config: Any) -> str:
    return rec.add("app", app, engine, "send", None, config or {"max_tokens": 10}).id


def test_changes_survive_a_new_record_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    rec = PolicyRecord(path)
    assert rec.load() == []
    p1, p2 = add(rec), add(rec, engine="acl", default="deny")
    rec.add("rule", "*", "metrics", "receive", "/kv.KV/Get", {})
    assert rec.update_config(p1, {"max_tokens": 99})
    assert rec.remove(p2) is not None and rec.remove(p2) is None
    assert not rec.update_config(p2, {})
    rec.record_engine_module("ratelimit", "site.ratelimit_v2")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["policies.json"]  # no temp file left

    again = PolicyRecord(path)
    loaded = again.load()
    assert [(e.id, e.kind, e.engine, e.config) for e in loaded] == [
        ("p1", "app", "ratelimit", {"max_tokens": 99}),
        ("p3", "rule", "metrics", {}),
    ]
    assert loaded[1].method == "/kv.KV/Get" and loaded[1].side == "receive"
    assert again.engine_modules == {"ratelimit": "site.ratelimit_v2"}
    assert add(again) == "p4"  # ids are never reused across restarts


def test_each_write_is_fsynced_and_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (
            synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"),
            real_fsync(fd),
        ),
    )
    add(PolicyRecord(tmp_path / "policies.json"))
    assert synced == ["file", "dir"]


def test_a_temp_file_left_by_a_crash_is_removed_at_load(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    add(PolicyRecord(path))
    (tmp_path / ".policies.json.0badcafe.tmp").write_text('{"format": 1, "poli')
    assert [e.id for e in PolicyRecord(path).load()] == ["p1"]
    assert [p.name for p in tmp_path.iterdir()] == ["policies.json"]


def test_a_failed_write_keeps_the_old_file_and_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policies.json"
    rec = PolicyRecord(path)
    add(rec)
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        add(rec, app="other")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["policies.json"]  # the temp file is gone
    assert [e.app for e in rec.entries.values()] == ["kv"]
    monkeypatch.undo()
    assert add(rec, app="other") == "p2"  # the failed one did not take an id for nothing


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": 1, "policies": [tru',  # torn or hand-edited
        b"\xff\xfe garbage",
        b"[]",
        b'{"format": 99, "policies": []}',
        b'{"format": 1, "policies": {}}',
    ],
    ids=["truncated", "binary", "not-a-mapping", "other-format", "policies-not-a-list"],
)
def test_a_corrupt_file_is_moved_aside_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "policies.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, "mrpcd.persist"):
        assert PolicyRecord(path).load() == []
    (aside,) = tmp_path.glob("policies.json.bad-*")
    assert aside.read_bytes() == content and not path.exists()
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"moved it to {aside.name}" in line and "started without recorded policies" in line


def test_a_symlink_in_place_of_the_record_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"format": 1, "policies": []}))
    (tmp_path / "policies.json").symlink_to(target)
    with caplog.at_level(logging.WARNING, "mrpcd.persist"):
        assert PolicyRecord(tmp_path / "policies.json").load() == []
    assert "cannot be opened" in caplog.text and target.exists()
    assert not (tmp_path / "policies.json").is_symlink()


def test_malformed_entries_are_dropped_by_index_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"id": "p2", "kind": "app", "app": "kv", "engine": "null", "side": "send"}
    good |= {"method": None, "config": {}}
    doc = {
        "format": 1,
        "policies": [
            "nonsense",
            dict(good, id="p1", kind="weird"),
            good,
            dict(good, extra=1),
            dict(good),  # a duplicate id
            dict(good, id="p5", config=[]),
        ],
        "engines": {"null": 3},
    }
    path = tmp_path / "policies.json"
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, "mrpcd.persist"):
        rec = PolicyRecord(path)
        assert [e.id for e in rec.load()] == ["p2"]
    text = caplog.text
    for i in (0, 1, 3, 4, 5):
        assert f"policies[{i}]" in text
    assert "malformed engine entry 'null'" in text and rec.engine_modules == {}


def test_a_disabled_record_reads_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    path.write_text("garbage")
    rec = PolicyRecord(path, enabled=False)
    assert rec.load() == []
    add(rec)
    assert path.read_text() == "garbage" and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------- restored by the PolicyManager


def manager(tmp_path: Path) -> PolicyManager:
    daemon = SimpleNamespace(
        config=SimpleNamespace(policies=(), persist_policies=True),
        registry=EngineRegistry({n: f"engines.{n}" for n in ("ratelimit", "null", "frontend")}),
        prefix=tmp_path,
    )
    return PolicyManager(daemon)  # type: ignore[arg-type]


def test_entries_with_an_unknown_engine_or_a_bad_config_are_skipped_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = PolicyRecord(tmp_path / "policies.json")
    rec.add("app", "kv", "vanished", "send", None, {})
    rec.add("app", "kv", "ratelimit", "send", None, {"max_tokens": -1})
    rec.add("app", "kv", "frontend", "send", None, {})
    rec.add("rule", "*", "ratelimit", "receive", None, {"max_tokens": 5})
    with caplog.at_level(logging.INFO, "mrpcd.policy"):
        pm = manager(tmp_path)
    assert list(pm.standing) == ["p4"]
    rule = pm.standing["p4"]
    assert (rule.selector, rule.side.value, rule.config["max_tokens"]) == ("*", "receive", 5)
    assert rule.record_id == "p4" and rule.record_kind == "rule"
    skipped = {e.id: e.skipped for e in pm.record.entries.values() if e.skipped}
    assert set(skipped) == {"p1", "p2", "p3"}
    assert "no engine named 'vanished'" in str(skipped["p1"])
    assert "max_tokens" in str(skipped["p2"]) and "not a policy" in str(skipped["p3"])
    for eid, engine in (("p1", "vanished"), ("p2", "ratelimit"), ("p3", "frontend")):
        assert f"persisted policy {eid} (attachment: {engine} on app 'kv'" in caplog.text
    # skipped entries stay recorded, and the operator can remove them by id
    assert pm.detach({"rule_id": "p1"})["unrecorded"] == "p1"
    assert [e["id"] for e in pm.list_persisted({})["policies"]] == ["p2", "p3", "p4"]


def test_a_recorded_engine_module_is_used_if_it_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = PolicyRecord(tmp_path / "policies.json")
    rec.record_engine_module("null", "engines.ratelimit")
    rec.record_engine_module("ratelimit", "no.such.module")
    with caplog.at_level(logging.INFO, "mrpcd.policy"):
        pm = manager(tmp_path)
    assert pm.daemon.registry.modules["null"] == "engines.ratelimit"
    assert pm.daemon.registry.modules["ratelimit"] == "engines.ratelimit"  # not the broken one
    assert "recorded upgrade of engine 'ratelimit' not used" in caplog.text
    assert pm.record_engine_module("qos", "engines.qos") is None
    assert json.loads((tmp_path / "policies.json").read_text())["engines"]["qos"] == "engines.qos"
