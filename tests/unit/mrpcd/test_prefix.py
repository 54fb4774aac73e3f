"""Checked directories and files of the daemon (mrpcd.prefix) and the checked disk cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from libmrpc._paths import app_socket_path, daemon_state
from libmrpc.status import RpcError, StatusCode
from mrpcd.bindcache import DiskCache
from mrpcd.compiler import Compiled
from mrpcd.prefix import PrefixError, ensure_dir, unix_listener, write_file


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_ensure_dir_creates_with_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o777)
    try:
        ensure_dir(tmp_path / "a" / "b", 0o755, "prefix")
        ensure_dir(tmp_path / "a" / "b" / "cache", 0o700, "cache directory")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a" / "b") == 0o755 and mode(tmp_path / "a" / "b" / "cache") == 0o700
    assert mode(tmp_path / "a") == 0o755


def test_ensure_dir_refuses_symlink_file_and_open_dirs(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(PrefixError, match="is a symlink"):
        ensure_dir(tmp_path / "link", 0o755, "prefix")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrefixError, match="as a directory: Not a directory"):
        ensure_dir(tmp_path / "file", 0o755, "prefix")
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(PrefixError, match="writable by group or others"):
        ensure_dir(tmp_path / "open", 0o755, "prefix")
    assert mode(tmp_path / "open") == 0o777  # never fixed up


def test_ensure_dir_refuses_an_open_non_sticky_ancestor(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    try:
        with pytest.raises(PrefixError, match="parent directory .* writable by others"):
            ensure_dir(tmp_path / "p", 0o755, "prefix")
        os.chmod(tmp_path, 0o1777)  # sticky, like /tmp: fine
        ensure_dir(tmp_path / "p", 0o755, "prefix")
    finally:
        os.chmod(tmp_path, 0o700)


def test_write_file_and_listener_modes(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_file(tmp_path / "f", b"data", 0o644)
        sock = unix_listener(tmp_path / "s.sock", 0o600)
    finally:
        os.umask(old)
    try:
        assert mode(tmp_path / "f") == 0o644 and (tmp_path / "f").read_bytes() == b"data"
        assert mode(tmp_path / "s.sock") == 0o600
        assert sorted(os.listdir(tmp_path)) == ["f", "s.sock"]  # no temporaries left
    finally:
        sock.close()


def test_app_side_refuses_state_file_others_may_write(tmp_path: Path) -> None:
    (tmp_path / "mrpcd.json").write_text('{"app_socket": "/x/app.sock"}')
    os.chmod(tmp_path / "mrpcd.json", 0o666)
    with pytest.raises(RpcError) as info:
        daemon_state(tmp_path)
    assert (
        info.value.code() == StatusCode.PERMISSION_DENIED
        and "others may write" in info.value.details()
    )
    os.chmod(tmp_path / "mrpcd.json", 0o644)
    assert daemon_state(tmp_path) == {"app_socket": "/x/app.sock"}
    os.chmod(tmp_path, 0o777)
    try:
        with pytest.raises(RpcError, match="others may write"):
            app_socket_path(tmp_path)
    finally:
        os.chmod(tmp_path, 0o700)


def test_disk_cache_rejects_tampered_entries_and_evicts(tmp_path: Path) -> None:
    ensure_dir(tmp_path / "c", 0o700, "cache directory")
    cache = DiskCache(tmp_path / "c", max_entries=2, max_bytes=1 << 20)
    keys = [f"{i:064x}" for i in range(3)]
    for k in keys[:2]:
        cache.store(Compiled(k, "h" * 16, b"payload " + k.encode()))
    assert cache.load(keys[0]) is not None  # keys[0] is now the most recently used
    path = tmp_path / "c" / f"{keys[1]}.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert cache.load(keys[1]) is None and not path.exists()
    cache.store(Compiled(keys[1], "h" * 16, b"again"))
    cache.store(Compiled(keys[2], "h" * 16, b"third"))  # over 2 entries: keys[0] is evicted
    assert sorted(os.listdir(tmp_path / "c")) == [".secret", f"{keys[1]}.bin", f"{keys[2]}.bin"]
    os.chmod(tmp_path / "c" / f"{keys[2]}.bin", 0o622)
    assert cache.load(keys[2]) is None
    (tmp_path / "c" / "stray.py").write_text("print('never run')")
    again = DiskCache(tmp_path / "c", max_entries=2, max_bytes=1 << 20)
    assert again.load(keys[1]) is not None and not (tmp_path / "c" / "stray.py").exists()


def test_daemon_user_can_be_trusted_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "p"
    prefix.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to give the prefix to another uid")
    os.chown(prefix, 12345, -1)
    with pytest.raises(RpcError, match="uid 12345"):
        app_socket_path(prefix)
    monkeypatch.setenv("MRPC_DAEMON_USER", "12345")
    assert app_socket_path(prefix) == str(prefix / "app.sock")
    monkeypatch.setenv("MRPC_DAEMON_USER", "no-such-user-here")
    with pytest.raises(RpcError, match="names no user"):
        app_socket_path(prefix)


def test_app_side_cache_ignores_files_others_may_write(tmp_path: Path) -> None:
    from libmrpc._schema import cache_key_for, read_proto
    from libmrpc.loader import load_proto

    proto = tmp_path / "appcache.proto"
    proto.write_text('syntax = "proto3";\npackage appcache;\nmessage M { int32 x = 1; }\n')
    cache = tmp_path / "cache"
    cache.mkdir()
    marker = tmp_path / "PWNED"
    planted = cache / f"{cache_key_for(read_proto(proto))}.py"
    planted.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    os.chmod(planted, 0o666)
    mod = load_proto(proto, cache_dir=cache)
    assert not marker.exists() and mod.M(x=3).x == 3
    assert stat.S_IMODE(os.stat(planted).st_mode) == 0o644  # replaced by our own file
