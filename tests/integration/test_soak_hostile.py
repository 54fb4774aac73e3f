"""Soak: hostile apps and hostile peers for minutes beside a well-behaved client.

Opt in with ``-m slow``; ``MRPC_SOAK_SECONDS`` sets the length (default 180 s).
Two daemons: ``a`` (the client side) and ``b`` (the server side). While a
steady client on ``a`` calls the server on ``b``, rounds of attacks run against
both daemons, one after another, again and again:

- hostile apps on ``a``: a flood that never reads its completions, one message
  with millions of shared references, duplicate call ids, endless deadlines,
  apps that register and hang up at once, deeply nested control messages;
- hostile peers on ``b``: garbage and HTTP on the peer port, headers announcing
  256 MiB bodies, bodies that stall or trickle, PING floods, oversized HELLOs,
  slowloris and idle connections.

It asserts what the hardening promises: the steady client's calls all succeed
(no stall longer than a few seconds), both daemons' memory stays within a bound
of their baseline, their fds return to baseline, and neither logs a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

import libmrpc
from libmrpc._control import open_control, recv_msg, send_msg
from libmrpc.wire.frames import CALL, PING, encode_header
from tests.integration.conftest import APPS, ROOT, Cluster, Daemon
from tests.integration.hostile_peer import Peer, call_frame, hello, proc_stats, request_image

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("MRPC_SOAK_SECONDS", "180"))
RSS_BOUND_MB = 300  # growth over the warmed-up baseline either daemon may show
PEER_LIMITS = """
tcp:
  handshake_timeout: 1.0
  header_timeout: 1.0
  body_stall_timeout: 1.0
  idle_timeout: 5.0
  write_stall_timeout: 2.0
"""


class Sampler(threading.Thread):
    """Samples RSS and fds of some pids every 0.5 s."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {name: 0 for name in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for name, pid in self.pids.items():
                try:
                    self.peak[name] = max(self.peak[name], proc_stats(pid)["rss_kb"])
                except OSError:
                    pass


def _hostile_app(
    cluster: Cluster, a: Daemon, b: Daemon, mode: str, *args: str, seconds: float = 3.0
) -> None:
    """Run one hostile app for a while, then make it go away (stdin closed, then kill)."""
    proc = subprocess.Popen(
        [sys.executable, str(APPS / "hostile_app.py"), str(a.prefix), b.listen, mode, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if "READY" not in out:  # it never got to attack: the soak would prove nothing
        raise AssertionError(f"hostile app {mode} did not start: {err[-500:]}")


def _hit_and_run(a: Daemon, n: int = 100) -> None:
    path = str(a.prefix / "app.sock")
    for _ in range(n):
        sock = open_control(path)
        send_msg(sock, {"op": "register", "name": "hit-and-run"})
        sock.close()


def _deep_json(a: Daemon) -> None:
    sock = open_control(str(a.prefix / "app.sock"))
    with sock:
        sock.sendall(b"[" * 50_000 + b"]" * 50_000)
        reply, _ = recv_msg(sock)
        assert reply is not None and not reply["ok"]


def _peer_attacks(b: Daemon, schema_hash: str) -> list[Callable[[], None]]:
    big = 256 << 20

    def huge_headers() -> None:
        peers = [Peer(b.listen) for _ in range(14)]
        for p in peers:
            p.send(encode_header(CALL, call_id=1, body_len=big))
        time.sleep(0.5)
        for p in peers:
            p.close()

    def stalled_bodies() -> None:
        peers = [Peer(b.listen) for _ in range(33)]
        for i, p in enumerate(peers):
            p.send(
                hello(schema_hash)
                + encode_header(CALL, call_id=i + 1, body_len=1 << 20)
                + b"x" * 100
            )
        time.sleep(1.5)
        for p in peers:
            p.close()

    def ping_flood() -> None:
        p = Peer(b.listen)
        frame = encode_header(PING, call_id=7) * 4096
        deadline = time.monotonic() + 1.5
        try:
            while time.monotonic() < deadline and p.send_some(frame):
                pass
        except OSError:
            pass
        p.close()

    def big_hello() -> None:
        p = Peer(b.listen)
        try:
            p.send(hello(schema_hash, services=[f"svc.S{i}" for i in range(80_000)]))
        except OSError:
            pass
        p.closed_by_daemon(3)
        p.close()

    def garbage() -> None:
        for data in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096), b"MR"):
            p = Peer(b.listen)
            try:
                p.send(data)
            except OSError:
                pass
            p.closed_by_daemon(3)
            p.close()

    def idle_and_slowloris() -> None:
        peers = [Peer(b.listen) for _ in range(200)]
        for i, p in enumerate(peers):
            if i % 2:
                p.send(b"M")
        time.sleep(1.5)
        for p in peers:
            p.close()

    def endless_timeouts() -> None:
        p = Peer(b.listen)
        p.send(hello(schema_hash))
        testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
        image = request_image(testing, payload=b"forever")
        for i in range(50):
            p.send(call_frame(image, call_id=100 + i, aux=(1 << 64) - 1))
        p.read_frames(lambda frames: len(frames) >= 51, timeout=5)
        p.close()

    return [
        huge_headers,
        stalled_bodies,
        ping_flood,
        big_hello,
        garbage,
        idle_and_slowloris,
        endless_timeouts,
    ]


@pytest.mark.timeout(SECONDS + 300)
def test_hostile_apps_and_peers_beside_a_steady_client(cluster: Cluster) -> None:
    a = cluster.daemon("a", config=PEER_LIMITS)
    b = cluster.daemon("b", config=PEER_LIMITS)
    cluster.server(b, "--mode", "inline", "--alltypes")
    steady = cluster.app(
        "steady_client.py", str(a.prefix), b.listen, "--seconds", str(SECONDS + 60), name="steady"
    )
    schemas = next(x for x in b.apps() if x["name"] == "server")["schemas"]
    schema_hash = next(s["hash"] for s in schemas if "mrpctest.Test" in s["services"])
    time.sleep(1.0)
    base = {"a": proc_stats(a.pid), "b": proc_stats(b.pid)}
    sampler = Sampler({"a": a.pid, "b": b.pid})
    sampler.start()

    app_attacks: list[Callable[[], None]] = [
        lambda: _hostile_app(cluster, a, b, "flood", "--count", "100000", "--seconds", "2"),
        lambda: _hostile_app(cluster, a, b, "refs", "--refs", "4000000"),
        lambda: _hostile_app(cluster, a, b, "dup"),
        lambda: _hostile_app(cluster, a, b, "deadline", "--count", "200"),
        lambda: _hit_and_run(a),
        lambda: _deep_json(a),
    ]
    peer_attacks = _peer_attacks(b, schema_hash)
    rounds = failures = 0
    problems: list[str] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < SECONDS:
        for attack in (*app_attacks, *peer_attacks):
            try:
                attack()
            except (OSError, AssertionError, subprocess.SubprocessError) as e:
                failures += 1
                problems.append(f"{getattr(attack, '__name__', 'attack')}: {type(e).__name__}: {e}")
            if time.monotonic() - t0 >= SECONDS:
                break
        rounds += 1
    time.sleep(6)  # the peer idle timeout and reclaim catch up
    sampler.stop.set()
    end = {"a": proc_stats(a.pid), "b": proc_stats(b.pid)}
    result = steady.result(timeout=60)  # closes its stdin: it stops and reports
    print(
        f"soak {SECONDS:.0f}s: {rounds} rounds of attacks ({failures} attack errors: {problems[:3]}); "
        f"steady client {json.dumps(result)}"
    )
    for name in ("a", "b"):
        print(
            f"daemon {name}: baseline {base[name]}, peak RSS {sampler.peak[name]} KiB, end {end[name]}"
        )

    assert rounds >= 1 and not problems, problems[:3]
    assert result["ok"] > 0 and not result["errors"], result
    assert result["max_gap_s"] < 5.0, result
    for name in ("a", "b"):
        growth_mb = (sampler.peak[name] - base[name]["rss_kb"]) / 1024
        assert growth_mb < RSS_BOUND_MB, f"daemon {name} grew by {growth_mb:.0f} MB"
        assert end[name]["fds"] <= base[name]["fds"] + 8, (name, base[name], end[name])
        assert end[name]["threads"] <= base[name]["threads"] + 4, (name, base[name], end[name])
    for d in (a, b):
        assert "Traceback" not in d.log()
