"""Live engine upgrade by name (``mrpcctl engine upgrade|rollback|call``) under load.

Each test keeps 64 calls in flight (asyncio workers, every call's payload
unique) while an engine is swapped for a copy of its module with VERSION bumped
(loaded from a file in the test's temporary directory), then rolled back: no
call may fail and none may be answered twice. Broken new versions (restore
raises, check_compatible refuses, no ENGINE) are rolled back with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
import threading
import time
from pathlib import Path
from typing import Any, Self

import pytest

import libmrpc
from libmrpc import RpcError
from tests.integration.conftest import ROOT, Cluster, Daemon

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")

MODULES = {
    "ratelimit": "ratelimit",
    "qos": "qos",
    "acl": "acl",
    "metrics": "metrics",
    "frontend": "frontend",
    "tcp": "tcp",
}


def base_version(name: str) -> int:
    """The VERSION engine ``name`` has in the installed code."""
    src = (ROOT / "engines" / f"{MODULES[name]}.py").read_text()
    found = re.findall(rf'NAME = "{name}"\n    VERSION = (\d+)', src)
    assert len(found) == 1, f"engines/{MODULES[name]}.py: no NAME/VERSION pair for {name!r}"
    return int(found[0])


def new_version(tmp: Path, name: str, version: int | None = None, tail: str = "") -> Path:
    """A copy of engine ``name``'s module with VERSION = ``version`` (default: one
    above the installed one) and ``tail`` appended."""
    src = (ROOT / "engines" / f"{MODULES[name]}.py").read_text()
    version = base_version(name) + 1 if version is None else version
    pattern = rf'(NAME = "{name}"\n    VERSION = )\d+'
    path = tmp / f"{name}_v{version}_{abs(hash(tail)) % 10_000}.py"
    path.write_text(re.sub(pattern, rf"\g<1>{version}", src, count=1) + tail)
    path.chmod(0o644)
    return path


class Load:
    """64 asyncio calls in flight, continuously, on a thread; records every completion."""

    def __init__(self, stub: Any, workers: int = 64) -> None:
        self.stub = stub
        self.workers = workers
        self.seen: collections.Counter[bytes] = collections.Counter()
        self.done: list[float] = []  # completion times (monotonic)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async def worker(w: int) -> None:
            i = 0
            while not self._stop.is_set():
                body = f"{w}:{i}".encode()
                try:
                    reply = await self.stub.Call.aio(testing.Request(payload=body), timeout=30)
                    if bytes(reply.payload) != body:
                        self.failures.append(f"mismatch {body!r}")
                    self.seen[body] += 1
                    self.done.append(time.monotonic())
                except RpcError as e:
                    self.failures.append(f"{body!r}: {e.code().name} {e.details()}")
                i += 1

        await asyncio.gather(*(worker(w) for w in range(self.workers)))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the load did not finish within 60 s"

    def wait_for(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.done) + n
        while len(self.done) < target:
            assert time.monotonic() < deadline, f"only {len(self.done)} of {target} calls done"
            assert not self.failures, self.failures[:5]
            time.sleep(0.02)

    def between(self, t0: float, t1: float) -> int:
        return sum(1 for t in list(self.done) if t0 <= t < t1)

    def longest_gap(self, t0: float, t1: float) -> float:
        ts = sorted(t for t in list(self.done) if t0 <= t <= t1)
        return max((b - a for a, b in itertools.pairwise(ts)), default=t1 - t0)

    def check(self) -> None:
        assert not self.failures, self.failures[:5]
        assert self.seen and max(self.seen.values()) == 1, "a call was answered twice"


def setup(cluster: Cluster) -> tuple[Daemon, Daemon, Any]:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b, "--mode", "inline")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="loadgen"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    return a, b, stub


def rows(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for app in d.apps() for e in app["datapath"] if e["engine"] == name]


def timed_upgrade(load: Load, d: Daemon, *args: str) -> tuple[Any, dict[str, float]]:
    """Run ``mrpcctl engine ARGS`` under load; the calls completed meanwhile and the gap."""
    t0 = time.monotonic()
    r = d.ctl("engine", *args)
    t1 = time.monotonic()
    load.wait_for(200)
    figures = {
        "ctl_s": round(t1 - t0, 3),
        "calls_during": load.between(t0, t1),
        "longest_gap_ms": round(load.longest_gap(t0 - 0.2, t1 + 0.2) * 1e3, 1),
    }
    return r, figures


POLICIES = {
    "qos": ["bulk_inflight=8", "small_threshold=0"],  # every call bulk, at most 8 out: held calls
    "acl": ["default=allow", "rules=[{name: no-admin, action: deny, field: key, equals: admin}]"],
    "metrics": [],
}


@pytest.mark.parametrize("name", ["qos", "acl", "metrics", "frontend", "tcp"])
def test_upgrade_and_rollback_under_load_lose_and_duplicate_nothing(
    cluster: Cluster, tmp_path: Path, name: str
) -> None:
    a, b, stub = setup(cluster)
    daemons = [a] if name in POLICIES else [a, b]
    eid = None
    if name in POLICIES:
        sets = [x for kv in POLICIES[name] for x in ("--set", kv)]
        (eid,) = a.ctl("policy", "attach", name, "--app", "loadgen", *sets)["engine_ids"]
    path = new_version(tmp_path, name)
    with Load(stub) as load:
        load.wait_for(300)
        before = a.ctl("engine", "call", eid, "stats")["result"]["stats"] if eid else None
        accepted = b.ctl("stats")["ingress"]["accepted"]
        for d in daemons:
            r, figures = timed_upgrade(load, d, "upgrade", name, "--file", str(path), "--all")
            print(f"{name} upgrade on {d.prefix.name}: {figures}, engines {r['engines']}")
            up = base_version(name) + 1
            assert r["version"] == up and r["engines"] and all(o["ok"] for o in r["engines"])
            assert all(e["version"] == up and e["module"] == str(path) for e in rows(d, name))
        # the client's connection to b was handed over, never re-opened
        assert b.ctl("stats")["ingress"]["accepted"] == accepted
        if eid:
            completed = len(load.done)  # every one of them passed the policy
            after = a.ctl("engine", "call", eid, "stats")["result"]["stats"]
            print(f"{eid} stats before {before}, after {after}")
            assert after["calls"] >= completed > before["calls"] > 100  # counted on, not reset
        for d in daemons:
            r, figures = timed_upgrade(load, d, "rollback", name)
            print(f"{name} rollback on {d.prefix.name}: {figures}")
            assert all(
                e["version"] == base_version(name) and e["module"] == f"engines.{MODULES[name]}"
                for e in rows(d, name)
            )
    load.check()
    print(f"{name}: {sum(load.seen.values())} calls, 0 failed, none answered twice")
    if name == "metrics":
        text = a.ctl("engine", "call", eid, "scrape")["result"]["text"]
        assert "grpc_client_started_total" in text


def test_ratelimit_upgrade_keeps_its_tokens(cluster: Cluster, tmp_path: Path) -> None:
    """Delay mode at 200 calls/s with a 200-token burst: a successor that started with a
    full bucket would let ~200 extra calls through right after the upgrade."""
    a, _b, stub = setup(cluster)
    rate, burst = 200, 200
    (eid,) = a.ctl(
        "policy",
        "attach",
        "ratelimit",
        "--app",
        "loadgen",
        "--set",
        "mode=delay",
        "--set",
        f"max_tokens={burst}",
        "--set",
        "tokens_per_fill=10",
        "--set",
        "fill_interval=0.05",
    )["engine_ids"]
    path = new_version(tmp_path, "ratelimit")
    with Load(stub) as load:
        load.wait_for(burst + 150)  # the first burst is spent; calls now wait for tokens
        t0 = time.monotonic()
        r = a.ctl("engine", "upgrade", "ratelimit", "--file", str(path), "--app", "loadgen")
        t1 = time.monotonic()
        time.sleep(1.0)
        window = time.monotonic() - t0
        admitted = load.between(t0, t0 + window)
        print(
            f"ratelimit: {admitted} calls in the {window:.2f} s around the upgrade "
            f"(limit {rate}/s -> {rate * window:.0f}; a fresh bucket would add {burst}); "
            f"ctl {t1 - t0:.2f} s, longest gap {load.longest_gap(t0, t1 + 0.2) * 1e3:.0f} ms"
        )
        assert r["engines"][0]["ok"] and r["engines"][0]["engine_id"] == eid
        assert admitted < rate * window + burst / 3, "the rate jumped: tokens were not kept"
        assert admitted > rate * window / 4, "calls stalled after the upgrade"
        stats = a.ctl("engine", "call", eid, "buckets")["result"]
        assert all(b["tokens"] < burst / 2 for b in stats["buckets"].values()), stats
        r = a.ctl("engine", "rollback", "ratelimit", "--app", "loadgen")
        assert r["engines"][0]["to_version"] == 1
        assert [e["version"] for e in rows(a, "ratelimit")] == [1]
    load.check()


_RAISES = """

class _Broken(ENGINE):
    def load_state(self, state, prev_version):
        raise RuntimeError("v2 cannot read this state")


ENGINE = _Broken
"""
_REFUSES = """

class _Picky(ENGINE):
    @classmethod
    def check_compatible(cls, prev_version, state):
        return f"v{cls.VERSION} only upgrades from v7"


ENGINE = _Picky
"""
BROKEN = {  # what the new version does: (appended code, what the answer must say)
    "restore raises": (_RAISES, "failed to restore: RuntimeError: v2 cannot read this state"),
    "check_compatible refuses": (_REFUSES, "refuses state of v{base}: v{up} only upgrades from v7"),
    "no ENGINE": ("\n\ndel ENGINE\n", "defines no ENGINE"),
}


@pytest.mark.parametrize("name", ["ratelimit", "tcp"])
def test_broken_new_versions_roll_back_under_load(
    cluster: Cluster, tmp_path: Path, name: str
) -> None:
    a, _b, stub = setup(cluster)
    if name == "ratelimit":
        a.ctl("policy", "attach", "ratelimit", "--app", "loadgen", "--set", "max_tokens=1000000")
    with Load(stub) as load:
        load.wait_for(200)
        for what, (tail, reason) in BROKEN.items():
            path = new_version(tmp_path, name, tail=tail)
            r = a.ctl("engine", "upgrade", name, "--file", str(path), "--all", check=False)
            print(f"{name}, {what}: exit {r.returncode}: {r.stderr.strip()}")
            base = base_version(name)
            reason = reason.format(base=base, up=base + 1)
            assert r.returncode != 0 and reason in r.stderr, r.stderr
            load.wait_for(100)  # calls keep succeeding
            assert [(e["version"], e["module"]) for e in rows(a, name)] == [
                (base, f"engines.{MODULES[name]}")
            ]
    load.check()
    assert "Traceback" not in a.log()


def test_engine_call_and_usage_errors(cluster: Cluster, tmp_path: Path) -> None:
    a, _b, stub = setup(cluster)
    (eid,) = a.ctl("policy", "attach", "acl", "--app", "loadgen", "--set", "default=allow")[
        "engine_ids"
    ]
    assert a.ctl("engine", "call", eid, "rules")["result"]["default"] == "allow"
    r = a.ctl("engine", "call", "loadgen/tcp", "stats", check=False)  # reached: it has no commands
    assert r.returncode != 0 and "engine 'tcp' has no command 'stats'" in r.stderr, r.stderr
    r = a.ctl("engine", "call", eid, "nonsense", check=False)
    assert r.returncode != 0 and "no command 'nonsense'" in r.stderr, r.stderr
    r = a.ctl("engine", "call", "nobody/acl-9", "stats", check=False)
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr, r.stderr
    r = a.ctl("engine", "rollback", "acl", check=False)
    assert r.returncode != 0 and "no previous version" in r.stderr, r.stderr
    r = a.ctl(
        "engine",
        "upgrade",
        "acl",
        "--file",
        str(new_version(tmp_path, "qos")),
        "--all",
        check=False,
    )
    assert r.returncode != 0 and "defines engine 'qos'" in r.stderr, r.stderr
    r = a.ctl(
        "engine",
        "upgrade",
        "tcp",
        "--file",
        str(new_version(tmp_path, "acl")),
        "--all",
        check=False,
    )
    assert r.returncode != 0 and "defines engine 'acl'" in r.stderr, r.stderr
    writable = new_version(tmp_path, "acl", version=3)
    writable.chmod(0o666)
    r = a.ctl("engine", "upgrade", "acl", "--file", str(writable), "--all", check=False)
    assert r.returncode != 0 and "chmod go-w" in r.stderr, r.stderr
    r = a.ctl("engine", "upgrade", "acl", "--module", "engines.acl", "--app", "loadgen")
    assert r["engines"][0]["ok"] and r["module"] == "engines.acl"
    assert stub.Call(testing.Request(key="bob"), timeout=10).key == "bob"
    # set and detach reach the instance that runs now, not the one it replaced
    a.ctl("policy", "set", eid, "default=deny")
    assert a.ctl("engine", "call", eid, "rules")["result"]["default"] == "deny"
    with pytest.raises(RpcError):
        stub.Call(testing.Request(key="bob"), timeout=10)
    a.ctl("policy", "detach", eid)
    assert rows(a, "acl") == []
    # --all: later attaches get the new code too (an upgrade of nothing running)
    v2 = new_version(tmp_path, "acl")
    assert a.ctl("engine", "upgrade", "acl", "--file", str(v2), "--all")["engines"] == []
    a.ctl("policy", "attach", "acl", "--app", "loadgen", "--set", "default=allow")
    assert [(e["version"], e["module"]) for e in rows(a, "acl")] == [
        (base_version("acl") + 1, str(v2))
    ]
    assert stub.Call(testing.Request(key="bob"), timeout=10).key == "bob"
