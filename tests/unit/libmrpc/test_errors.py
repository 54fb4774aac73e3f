"""The error hierarchy says who is at fault: local misuse vs. a bad peer or app."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import engines
import libmrpc
import mrpcd
from libmrpc.status import ConfigError, LocalError, MrpcError, RpcError, SchemaError, StatusCode
from libmrpc.wire import marshal
from libmrpc.wire.errors import TooBig, WireError
from libmrpc.wire.frames import FrameAssembler
from libmrpc.wire.metadata import MetadataError
from libmrpc.wire.ring import RingCorrupted
from mrpcd.config import load_config
from mrpcd.prefix import PrefixError
from mrpcd.registry import EngineLoadError, EngineRegistry


@pytest.mark.parametrize("cls", [ConfigError, SchemaError, EngineLoadError, PrefixError])
def test_local_misuse_is_a_local_error_not_a_wire_error(cls: type[Exception]) -> None:
    assert issubclass(cls, LocalError) and issubclass(cls, MrpcError)
    assert not issubclass(cls, WireError)


@pytest.mark.parametrize("cls", [WireError, TooBig, RingCorrupted, MetadataError])
def test_bad_bytes_are_a_wire_error_not_a_local_error(cls: type[Exception]) -> None:
    assert issubclass(cls, WireError) and issubclass(cls, MrpcError)
    assert not issubclass(cls, LocalError)


def test_wire_errors_carry_the_status_of_the_rpc_they_fail() -> None:
    assert WireError("bad offset").status == StatusCode.INVALID_ARGUMENT
    assert WireError("late", StatusCode.DATA_LOSS).status == StatusCode.DATA_LOSS
    big = TooBig("needs 10 bytes", at_least=10)
    assert big.status == StatusCode.RESOURCE_EXHAUSTED and big.at_least == 10
    assert marshal.TooBig is TooBig  # one class, re-exported where it is raised


def test_rpc_error_is_neither() -> None:
    """An RPC's status (what a caller catches) is not an mrpc-side fault type."""
    assert not issubclass(RpcError, MrpcError)


def test_bad_config_raises_a_local_error(tmp_path: Path) -> None:
    path = tmp_path / "mrpcd.yaml"
    path.write_text("no_such_key: 1\n")
    with pytest.raises(LocalError, match="no_such_key"):
        load_config(path, env={})


def test_unknown_engine_raises_a_local_error() -> None:
    with pytest.raises(LocalError, match="no engine named 'nope'"):
        EngineRegistry({}).get("nope")


def test_garbage_from_a_peer_raises_a_wire_error() -> None:
    with pytest.raises(WireError) as e:
        FrameAssembler().feed(b"GET / HTTP/1.1\r\n\r\n" + bytes(32))
    assert not isinstance(e.value, LocalError)
    assert e.value.status == StatusCode.INVALID_ARGUMENT


def _all_modules() -> list[str]:
    names = []
    for pkg in (libmrpc, mrpcd, engines):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith(".__main__"):  # importing it would run the CLI
                names.append(info.name)
    return names


def test_every_mrpc_error_class_names_one_culprit() -> None:
    """Each MrpcError subclass in the tree is a LocalError or a WireError, never both."""
    seen = []
    for name in _all_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, MrpcError):
                continue
            if cls in (MrpcError, LocalError, WireError):
                continue
            seen.append(cls)
            assert issubclass(cls, LocalError) != issubclass(cls, WireError), (
                f"{name}.{cls.__name__} must subclass exactly one of LocalError "
                f"(local misuse) and WireError (a bad peer or app)"
            )
    assert {ConfigError, SchemaError, EngineLoadError, PrefixError, TooBig} <= set(seen)
