"""Engines are loaded by module path and rejected early, with the gap named."""

from __future__ import annotations

import sys
import types

import pytest

from mrpcd.engine import Engine
from mrpcd.registry import EngineLoadError, EngineRegistry, load_engine_class


def _module(name: str, **attrs: object) -> str:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return name


class Good(Engine):
    NAME = "good"

    def do_work(self) -> int:
        return 0


class NoWork(Engine):
    NAME = "nowork"


def test_good_engine_loads() -> None:
    assert load_engine_class(_module("eng_good", ENGINE=Good)) is Good
    reg = EngineRegistry({"good": "eng_good"})
    assert reg.get("good") is Good and reg.names() == ["good"]


@pytest.mark.parametrize(
    "attrs, words",
    [
        ({}, ["defines no ENGINE"]),
        ({"ENGINE": object}, ["subclass of mrpcd.engine.Engine"]),
        ({"ENGINE": NoWork}, ["does not implement do_work", "def do_work(self) -> int"]),
        ({"ENGINE": type("Nameless", (Good,), {"NAME": ""})}, ["needs a NAME"]),
    ],
)
def test_bad_engines_are_rejected_naming_the_gap(attrs: dict, words: list[str]) -> None:
    name = _module(f"eng_bad_{len(sys.modules)}", **attrs)
    with pytest.raises(EngineLoadError) as e:
        load_engine_class(name, name="policy-x")
    assert "policy-x" in str(e.value) and name in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_missing_module_and_unknown_name() -> None:
    with pytest.raises(EngineLoadError, match="cannot import"):
        load_engine_class("no.such.module")
    with pytest.raises(EngineLoadError, match="no engine named 'x'; known engines: good"):
        EngineRegistry({"good": "eng_good"}).get("x")
