"""Bugs found using mrpc as a user would (issue "One door for engines", section 4)."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.conftest import ROOT


def test_failed_start_leaves_prefix_clean(tmp_path):
    """``transport: rdma`` on a host without RDMA fails to start and leaves no
    ``app.sock``, ``ctl.sock`` or ``mrpcd.lock`` behind."""
    prefix = tmp_path / "p"
    cfg = tmp_path / "rdma.yaml"
    cfg.write_text("transport: rdma\n")
    r = subprocess.run([sys.executable, "-m", "mrpcd", "run", "--prefix", str(prefix),
                        "--listen", "127.0.0.1:0", "--config", str(cfg)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    print("exit", r.returncode, r.stderr.strip().splitlines()[-1:])
    assert r.returncode != 0 and "rdma" in r.stderr
    assert "Traceback" not in r.stderr
    left = sorted(p.name for p in prefix.iterdir()) if prefix.exists() else []
    print("left in the prefix:", left)
    assert not {"app.sock", "ctl.sock", "mrpcd.lock", "mrpcd.json"} & set(left), left


def test_full_send_heap_is_an_rpc_error(cluster):
    """Building a message in a full send heap raises an RpcError with
    RESOURCE_EXHAUSTED (still a MemoryError for old callers), and the app goes on."""
    import libmrpc
    from libmrpc import RpcError, StatusCode

    testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
    a = cluster.daemon("a", config="shm:\n  send_heap_size: 1048576\n")
    b = cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="fullheap"))
    try:
        testing.Request(payload=b"x" * (2 << 20))
    except RpcError as e:
        print("error:", e)
        assert e.code() is StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(e, MemoryError)
    else:
        raise AssertionError("a 2 MiB message fit in a 1 MiB send heap")
    assert bytes(stub.Call(testing.Request(payload=b"after"), timeout=10).payload) == b"after"
