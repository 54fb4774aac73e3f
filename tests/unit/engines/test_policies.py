"""Every policy spec in policies/ names a real engine and passes its validate_config."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from mrpcd.engine import validate_engine_class

POLICIES = Path(__file__).resolve().parents[3] / "policies"
SPECS = sorted(POLICIES.glob("*.yaml"))
SPEC_KEYS = {"engine", "side", "method", "config", "app"}


def test_the_documented_specs_exist() -> None:
    names = {p.name for p in SPECS}
    assert {
        "ratelimit-1k.yaml",
        "acl-denylist.yaml",
        "qos-small-first.yaml",
        "metrics-all.yaml",
        "logging-sampled.yaml",
        "null.yaml",
    } <= names


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_spec_validates(path: Path) -> None:
    spec = yaml.safe_load(path.read_text())
    assert isinstance(spec, dict) and set(spec) <= SPEC_KEYS, f"{path.name}: keys {sorted(spec)}"
    assert spec.get("side", "send") in ("send", "receive")
    assert spec.get("method") is None or isinstance(spec["method"], str)
    name = spec["engine"]
    assert isinstance(name, str), f"{path.name}: engine must be a string, got {name!r}"
    module = importlib.import_module(f"engines.{name}")
    cls = validate_engine_class(module.ENGINE, f"engines.{name}")
    assert cls.NAME == name
    cls.validate_config(spec.get("config") or {})


def test_ratelimit_1k_is_1000_per_second() -> None:
    spec = yaml.safe_load((POLICIES / "ratelimit-1k.yaml").read_text())
    cfg = importlib.import_module("engines.ratelimit").ENGINE.validate_config(spec["config"])
    assert cfg["tokens_per_fill"] / cfg["fill_interval"] == pytest.approx(1000)
