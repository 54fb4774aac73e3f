"""The binding cache: modules in memory, verified entries on disk, cold compiles
in a child; tampered entries are ignored; memory and disk stay within bounds."""

from __future__ import annotations

import gc
import os
from dataclasses import replace
from pathlib import Path

import pytest

from libmrpc._schema import cache_key_for
from libmrpc.status import RpcError, SchemaError, StatusCode
from mrpcd import binding as binding_mod
from mrpcd.bindcache import MAGIC
from mrpcd.binding import BindingCache
from mrpcd.config import SchemaConfig

LIMITS = SchemaConfig(
    max_bytes=256 << 10,
    max_per_app=16,
    compile_timeout=60.0,
    compile_memory=512 << 20,
    compile_jobs=2,
    keep_unused=0,
    cache_max_entries=256,
    cache_max_bytes=256 << 20,
)


def texts(n: int) -> dict[str, str]:
    return {
        f"s{n}.proto": f'syntax = "proto3";\npackage s{n};\nmessage M {{ int64 x = 1; }}\n'
        f"service S{n} {{ rpc Get(M) returns (M); }}\n"
    }


def entry(cache_dir: Path, t: dict[str, str]) -> Path:
    return cache_dir / f"{cache_key_for(t)}.bin"


def test_compiled_then_memory_then_disk(tmp_path: Path) -> None:
    cache = BindingCache(tmp_path / "c", LIMITS)
    first = cache.bind(texts(1))
    assert first.how == "compiled" and entry(tmp_path / "c", texts(1)).is_file()
    assert first.module.SERVICES == {"s1.S1": (0,)}
    again = cache.bind(texts(1))  # an app holds the module: another bind shares it
    assert again.how == "memory" and again.module is first.module
    held = first.module
    del first, again
    restarted = BindingCache(tmp_path / "c", LIMITS)  # a new daemon: nothing in memory
    from_disk = restarted.bind(texts(1))
    assert from_disk.how == "disk" and from_disk.schema_hash == held.SCHEMA_HASH
    assert from_disk.module is not held
    assert restarted.counts == {"memory": 0, "disk": 1, "compiled": 0, "failed": 0}


def test_disk_hit_does_not_start_the_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    BindingCache(tmp_path / "c", LIMITS).bind(texts(2))

    def no_compile(*_a: object, **_k: object) -> None:
        raise AssertionError("compiled although the disk cache had the entry")

    monkeypatch.setattr(binding_mod, "compile_in_child", no_compile)
    assert BindingCache(tmp_path / "c", LIMITS).bind(texts(2)).how == "disk"


@pytest.mark.parametrize(
    "tamper",
    ["flip a payload byte", "flip a keyed-hash byte", "truncate", "another schema's entry"],
)
def test_a_tampered_cache_file_is_ignored_and_compiled_again(tmp_path: Path, tamper: str) -> None:
    cache_dir = tmp_path / "c"
    cache = BindingCache(cache_dir, LIMITS)
    cache.bind(texts(3))
    path = entry(cache_dir, texts(3))
    data = bytearray(path.read_bytes())
    if tamper == "flip a payload byte":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif tamper == "flip a keyed-hash byte":  # the rest is intact: only the HMAC tells
        data[len(MAGIC)] ^= 1
        path.write_bytes(bytes(data))
    elif tamper == "truncate":
        path.write_bytes(bytes(data[:20]))
    else:
        cache.bind(texts(4))
        os.replace(entry(cache_dir, texts(4)), path)
    path.chmod(0o600)
    bad = path.read_bytes()
    restarted = BindingCache(cache_dir, LIMITS)
    result = restarted.bind(texts(3))
    assert result.how == "compiled" and result.module.SERVICES == {"s3.S3": (0,)}
    assert path.read_bytes() != bad  # the bad entry was replaced by a good one
    assert BindingCache(cache_dir, LIMITS).bind(texts(3)).how == "disk"


def test_an_entry_writable_by_others_is_not_used(tmp_path: Path) -> None:
    cache_dir = tmp_path / "c"
    BindingCache(cache_dir, LIMITS).bind(texts(5))
    entry(cache_dir, texts(5)).chmod(0o666)
    assert BindingCache(cache_dir, LIMITS).bind(texts(5)).how == "compiled"


def test_unused_modules_kept_in_memory_are_bounded(tmp_path: Path) -> None:
    cache = BindingCache(tmp_path / "c", replace(LIMITS, keep_unused=1))
    for n in (6, 7):
        cache.bind(texts(n))  # nobody holds the modules after the call
    stats = cache.stats
    assert stats["kept_unused"] == 1 and stats["loaded"] == 1  # only the most recent stays
    assert cache.bind(texts(7)).how == "memory"
    assert cache.bind(texts(6)).how == "disk"  # evicted from memory, still on disk


def test_a_held_module_stays_loaded_beyond_keep_unused(tmp_path: Path) -> None:
    cache = BindingCache(tmp_path / "c", LIMITS)  # keep_unused=0
    held = cache.bind(texts(8)).module
    gc.collect()
    assert cache.stats["loaded"] == 1 and cache.bind(texts(8)).module is held
    del held
    assert cache.stats["loaded"] == 0


def test_disk_entries_are_bounded_least_recently_used_first(tmp_path: Path) -> None:
    cache_dir = tmp_path / "c"
    cache = BindingCache(cache_dir, replace(LIMITS, cache_max_entries=2))
    for n in (9, 10):
        cache.bind(texts(n))
    cache.disk.load(cache_key_for(texts(9)))  # 9 is now the most recently used
    cache.bind(texts(11))
    assert entry(cache_dir, texts(9)).exists() and entry(cache_dir, texts(11)).exists()
    assert not entry(cache_dir, texts(10)).exists()
    assert cache.stats["disk_entries"] == 2
    size = entry(cache_dir, texts(11)).stat().st_size
    small = BindingCache(
        cache_dir, replace(LIMITS, cache_max_bytes=size)
    )  # a restart with less room
    assert small.stats["disk_entries"] == 1 and small.stats["disk_bytes"] <= size


def test_bad_texts_and_limits(tmp_path: Path) -> None:
    cache = BindingCache(tmp_path / "c", replace(LIMITS, max_bytes=1024))
    with pytest.raises(RpcError) as e:
        cache.bind({"big.proto": "x" * 2000})
    assert (
        e.value.code() == StatusCode.RESOURCE_EXHAUSTED and "schema.max_bytes" in e.value.details()
    )
    with pytest.raises(RpcError) as e:
        cache.bind(["not", "a", "dict"])
    assert e.value.code() == StatusCode.INVALID_ARGUMENT
    with pytest.raises(SchemaError):
        cache.bind({"bad.proto": 'syntax = "proto3";\nmessage {'})
    assert cache.counts["failed"] == 1 and cache.stats["disk_entries"] == 0
