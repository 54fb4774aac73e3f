"""A local misuse at startup is one clear line, not a traceback (LocalError)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_bad_engine_module_is_a_clean_startup_error(tmp_path: Path) -> None:
    config = tmp_path / "mrpcd.yaml"
    config.write_text("engines:\n  frontend: no_such_engine_module\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mrpcd", "run", "--config", str(config)]
        + ["--prefix", str(tmp_path / "prefix"), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (
        "Error: engine 'frontend' (module no_such_engine_module): cannot import: "
        "ModuleNotFoundError" in proc.stderr
    ), proc.stderr
