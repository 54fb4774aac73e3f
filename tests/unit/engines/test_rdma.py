"""The RDMA transport says clearly why it cannot run here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engines.rdma import rdma_devices, unavailable_reason

ROOT = Path(__file__).resolve().parents[3]


def test_no_devices_is_reported(tmp_path: Path) -> None:
    assert rdma_devices(str(tmp_path / "missing")) == []
    reason = unavailable_reason(str(tmp_path / "missing"))
    assert reason is not None and "no RDMA device" in reason and "transport: tcp" in reason


def test_devices_without_pyverbs_are_reported(tmp_path: Path) -> None:
    (tmp_path / "mlx5_0").mkdir()
    assert rdma_devices(str(tmp_path)) == ["mlx5_0"]
    reason = unavailable_reason(str(tmp_path))
    assert reason is not None and "mlx5_0" in reason


def test_daemon_refuses_rdma_transport_with_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrpcd",
            "run",
            "--prefix",
            str(tmp_path / "p"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"MRPC_TRANSPORT": "rdma", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert r.returncode != 0
    assert "transport rdma" in r.stderr and ("RDMA" in r.stderr), r.stderr
    assert "Traceback" not in r.stderr
