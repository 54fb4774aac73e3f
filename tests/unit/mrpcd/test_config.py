"""Tests for mrpcd.config: layering, parsing, validation and error messages."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from libmrpc.status import ConfigError
from mrpcd import config as cfgmod
from mrpcd.config import (
    Config,
    PolicyAttachment,
    default_prefix,
    env_var_name,
    format_hostport,
    load_config,
    parse_hostport,
    parse_size,
)

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy" / "mrpcd.yaml"


@pytest.fixture
def write(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "mrpcd.yaml"
        path.write_text(text)
        return path

    return write


def load(text: str | None = None, tmp: Path | None = None, **kw: object) -> Config:
    kw.setdefault("env", {})
    if text is None:
        return load_config(**kw)  # type: ignore[arg-type]
    assert tmp is not None
    path = tmp / "c.yaml"
    path.write_text(text)
    return load_config(path, **kw)  # type: ignore[arg-type]


def error(text: str, tmp: Path, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(text, tmp, **kw)
    return str(info.value)


# -- defaults -------------------------------------------------------------------


def test_defaults_without_file() -> None:
    c = load_config(env={})
    prefix = default_prefix({})
    assert (
        c.prefix
        == prefix
        == (Path("/run/mrpc") if os.geteuid() == 0 else Path(f"/tmp/mrpc-{os.geteuid()}"))
    )
    assert c.listen == ("127.0.0.1", 5150)
    assert (c.transport, c.log_level) == ("tcp", "info")
    assert c.app_socket == prefix / "app.sock"
    assert c.operator_socket == prefix / "ctl.sock"
    assert c.cache_dir == prefix / "cache"
    assert c.operator_group is None
    assert (c.runtimes, c.spin_us, c.drain_timeout) == (1, 50, 5.0)
    assert c.max_message_size == 256 << 20
    assert c.shm == cfgmod.ShmConfig(1 << 30, 1 << 30, 4096)
    assert c.tcp == cfgmod.TcpConfig(True, 3.0, 2048, None, None)
    assert c.metrics.listen is None
    assert c.engines["ratelimit"] == "engines.ratelimit" and len(c.engines) == 9
    assert c.policies == ()


def test_default_prefix_uses_own_private_xdg_runtime_dir(tmp_path: Path) -> None:
    uid = os.geteuid() or 54321  # as root: pretend to be a user who owns tmp_path
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    os.chmod(xdg, 0o700)
    if os.geteuid() == 0:
        os.chown(xdg, uid, -1)
    assert default_prefix({"XDG_RUNTIME_DIR": str(xdg)}, uid=uid) == xdg / "mrpc"
    fallback = Path(f"/tmp/mrpc-{uid}")
    assert default_prefix({"XDG_RUNTIME_DIR": str(tmp_path / "nope")}, uid=uid) == fallback
    assert default_prefix({"XDG_RUNTIME_DIR": "relative"}, uid=uid) == fallback
    os.chmod(xdg, 0o755)  # not private: not an XDG runtime dir
    assert default_prefix({"XDG_RUNTIME_DIR": str(xdg)}, uid=uid) == fallback
    os.chmod(xdg, 0o700)
    assert default_prefix({"XDG_RUNTIME_DIR": str(xdg)}, uid=uid + 1) == Path(
        f"/tmp/mrpc-{uid + 1}"
    )  # not ours
    assert default_prefix({}, uid=0) == Path("/run/mrpc")
    assert default_prefix({"RUNTIME_DIRECTORY": "/run/x:/run/y"}, uid=uid) == Path("/run/x")
    assert load_config(env={"RUNTIME_DIRECTORY": str(tmp_path)}).prefix == tmp_path


def test_config_is_frozen() -> None:
    c = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.runtimes = 2  # type: ignore[misc]


# -- the YAML file ----------------------------------------------------------------


def test_yaml_overrides(tmp_path: Path) -> None:
    c = load(
        """
prefix: /srv/mrpc
listen: "[::1]:0"
transport: RDMA
operator_group: mrpc
app_socket: /run/app.sock
runtimes: 4
max_message_size: 4M
shm: {send_heap_size: 64MiB, ring_slots: 1024}
tcp: {nodelay: no, sndbuf: 4k, connect_timeout: 1}
metrics: {listen: "localhost:9150"}
""",
        tmp_path,
    )
    assert c.prefix == Path("/srv/mrpc")
    assert c.listen == ("::1", 0)
    assert c.transport == "rdma"
    assert c.operator_group == "mrpc"
    assert c.app_socket == Path("/run/app.sock")  # absolute: not under prefix
    assert c.operator_socket == Path("/srv/mrpc/ctl.sock")
    assert c.runtimes == 4 and c.max_message_size == 4 << 20
    assert c.shm == cfgmod.ShmConfig(64 << 20, 1 << 30, 1024)
    assert c.tcp == cfgmod.TcpConfig(False, 1.0, 2048, 4096, None)
    assert c.metrics.listen == ("localhost", 9150)


def test_empty_file_and_empty_sections_are_defaults(tmp_path: Path) -> None:
    assert load("", tmp_path) == load()
    assert load("# nothing\n", tmp_path) == load()
    assert load("shm:\ntcp: {}\npolicies:\nengines:\n", tmp_path) == load()


def test_deploy_file_equals_defaults() -> None:
    assert load_config(DEPLOY, env={}) == load_config(env={})


def test_deploy_file_documents_every_key() -> None:
    text = DEPLOY.read_text()
    for key in cfgmod._KEYS:
        leaf = key.split(".")[-1]
        assert re.search(rf"^#? *{leaf}:", text, re.MULTILINE), key
        if key not in cfgmod._NO_ENV:
            assert env_var_name(key) in text, key


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="/no/such/mrpcd.yaml: config file not found"):
        load_config("/no/such/mrpcd.yaml", env={})


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}: cannot read config file"):
        load_config(tmp_path, env={})


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    msg = error("listen: x\nshm:\n  ring_slots: [1, 2\n", tmp_path)
    assert re.match(rf"{tmp_path}/c.yaml:\d+: invalid YAML", msg), msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "(top level): expected a mapping, got ['a']" in error("- a\n", tmp_path)


def test_duplicate_key(tmp_path: Path) -> None:
    assert error("runtimes: 1\nruntimes: 2\n", tmp_path).endswith(":2: runtimes: duplicate key")


# -- unknown keys -----------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = error("listen: '127.0.0.1:1'\nlistne: x\n", tmp_path)
    assert msg.startswith(f"{tmp_path}/c.yaml:2: listne: unknown key (did you mean 'listen'?)")


def test_unknown_nested_key(tmp_path: Path) -> None:
    msg = error("shm:\n  ring_slot: 64\n", tmp_path)
    assert msg.startswith(f"{tmp_path}/c.yaml:2: shm.ring_slot: unknown key")
    assert "ring_slots" in msg


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    assert "c.yaml:1: tcp: expected a mapping, got 5" in error("tcp: 5\n", tmp_path)


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match="command line: shm.slots: unknown key"):
        load_config(env={}, overrides={"shm.slots": 64})


# -- values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_message_size: lots", 'max_message_size: expected a size such as 1048576, "64MiB"'),
        ("max_message_size: 64MB", "KB/MB/GB are ambiguous"),
        ("max_message_size: -1", "expected a non-negative size, got -1"),
        ("shm: {send_heap_size: 768MiB}", "expected a power of two between 64KiB and 64GiB"),
        (
            "shm:\n  ring_slots: 1000",
            "c.yaml:2: shm.ring_slots: expected a power of two between 64 and 1048576, got 1000",
        ),
        ("shm: {ring_slots: 32}", "shm.ring_slots: expected a power of two"),
        ("listen: '127.0.0.1:70000'", "listen: expected host:port"),
        ("listen: '127.0.0.1'", "listen: expected host:port"),
        ("listen: '::1:5150'", "IPv6 addresses need brackets"),
        ("listen: '[nothost]:5150'", "listen: expected host:port"),
        ("listen: 10:20", "(quote it in YAML), got 620"),
        ("transport: udp", "transport: expected one of tcp, rdma, got 'udp'"),
        ("log_level: verbose", "log_level: expected one of debug, info, warning, error"),
        ("runtimes: 0", "runtimes: expected an integer between 1 and 64, got 0"),
        ("runtimes: true", "runtimes: expected an integer between 1 and 64, got True"),
        ("spin_us: 1.5", "spin_us: expected an integer"),
        ("drain_timeout: -1", "drain_timeout: expected a number of seconds at least 0"),
        ("tcp: {connect_timeout: 0}", "tcp.connect_timeout: expected a number of seconds greater"),
        ("tcp: {nodelay: maybe}", "tcp.nodelay: expected a boolean"),
        ("tcp: {sndbuf: 12}", "tcp.sndbuf: expected a size between 1KiB"),
        ("operator_group: 'bad group'", "operator_group: expected a group name"),
        ("cache_dir: ''", "cache_dir: expected a non-empty path"),
        (
            "max_message_size: 1GiB",
            "max_message_size: expected at most half the smaller shm heap (512MiB), got 1GiB",
        ),
        ("prefix: /" + "p" * 100, ":1: prefix: app_socket '/ppp"),
    ],
)
def test_bad_values_name_file_line_key_and_expectation(
    tmp_path: Path, text: str, expected: str
) -> None:
    msg = error(text + "\n", tmp_path)
    assert msg.startswith(f"{tmp_path}/c.yaml:"), msg
    assert expected in msg, msg


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("4k", 4096),
        ("4K", 4096),
        ("512KiB", 512 << 10),
        ("64MiB", 64 << 20),
        ("64 mib", 64 << 20),
        ("1GiB", 1 << 30),
        ("2T", 2 << 40),
        ("10B", 10),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value, key="k", source="s") == size


@pytest.mark.parametrize("value", ["", "1.5GiB", "-4k", "4kb", "4 x", None, True, 1.0, [1]])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^here: a.b: expected"):
        parse_size(value, key="a.b", source="here")


@pytest.mark.parametrize(
    ("value", "hostport"),
    [
        ("127.0.0.1:5150", ("127.0.0.1", 5150)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:5150", ("::1", 5150)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
        (" node-1.example:80 ", ("node-1.example", 80)),
    ],
)
def test_parse_hostport(value: str, hostport: tuple[str, int]) -> None:
    assert parse_hostport(value, key="listen", source="s") == hostport
    assert parse_hostport(format_hostport(*hostport), key="listen", source="s") == hostport


@pytest.mark.parametrize(
    "value", [":5150", "host:", "host:-1", "host:65536", "[::1]5150", "a b:1", 5150, None]
)
def test_parse_hostport_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^s: listen: expected host:port"):
        parse_hostport(value, key="listen", source="s")


# -- environment and precedence ---------------------------------------------------


def test_env_overrides_and_parsing() -> None:
    env = {
        "MRPC_PREFIX": "/srv/x",
        "MRPC_LISTEN": "0.0.0.0:7000",
        "MRPC_SHM_SEND_HEAP_SIZE": "64MiB",
        "MRPC_SHM_RING_SLOTS": "128",
        "MRPC_TCP_NODELAY": "Off",
        "MRPC_TCP_SNDBUF": "1MiB",
        "MRPC_TCP_RCVBUF": "",
        "MRPC_SPIN_US": "0",
        "MRPC_DRAIN_TIMEOUT": "0.5",
        "MRPC_OPERATOR_GROUP": "mrpc",
        "MRPC_METRICS_LISTEN": "[::1]:9150",
        "MRPC_ENGINES": "ignored: no env override",
        "MRPC_APP_NAME": "unrelated, ignored",
    }
    c = load_config(env=env)
    assert c.prefix == Path("/srv/x") and c.cache_dir == Path("/srv/x/cache")
    assert c.listen == ("0.0.0.0", 7000)
    assert c.shm.send_heap_size == 64 << 20 and c.shm.ring_slots == 128
    assert c.tcp.nodelay is False and c.tcp.sndbuf == 1 << 20 and c.tcp.rcvbuf is None
    assert (c.spin_us, c.drain_timeout) == (0, 0.5)
    assert c.operator_group == "mrpc"
    assert c.metrics.listen == ("::1", 9150)
    assert c.engines == load_config(env={}).engines


@pytest.mark.parametrize("word", ["1", "true", "YES", "on"])
def test_env_bool_true(word: str) -> None:
    assert load_config(env={"MRPC_TCP_NODELAY": word}).tcp.nodelay is True


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"MRPC_TCP_NODELAY": "maybe"})
    assert str(info.value) == (
        "environment variable MRPC_TCP_NODELAY: tcp.nodelay: expected a boolean "
        "(true/false, yes/no, on/off, 1/0), got 'maybe'"
    )
    with pytest.raises(ConfigError, match="^environment variable MRPC_RUNTIMES: runtimes:"):
        load_config(env={"MRPC_RUNTIMES": "many"})


def test_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("runtimes: 2\nspin_us: 10\nlog_level: debug\n")
    env = {"MRPC_RUNTIMES": "3", "MRPC_SPIN_US": "20"}
    c = load_config(path, env=env, overrides={"runtimes": 4, "log_level": None})
    assert (c.runtimes, c.spin_us, c.log_level) == (4, 20, "debug")  # None = not given


def test_overrides_use_dotted_keys_and_strings() -> None:
    c = load_config(
        env={}, overrides={"listen": "127.0.0.1:0", "prefix": "/tmp/x", "tcp.nodelay": "no"}
    )
    assert c.listen == ("127.0.0.1", 0) and c.prefix == Path("/tmp/x")
    assert c.tcp.nodelay is False
    with pytest.raises(ConfigError, match="^command line: spin_us: expected an integer"):
        load_config(env={}, overrides={"spin_us": "fast"})


def test_default_max_message_size_follows_small_heaps() -> None:
    env = {"MRPC_SHM_SEND_HEAP_SIZE": "64MiB"}
    assert load_config(env=env).max_message_size == 32 << 20
    with pytest.raises(ConfigError, match="^command line: max_message_size: expected at most"):
        load_config(env=env, overrides={"max_message_size": "64MiB"})


def test_relative_prefix_is_made_absolute() -> None:
    c = load_config(env={}, overrides={"prefix": "run"})
    assert c.prefix == Path.cwd() / "run" and c.prefix.is_absolute()


# -- engines and policies -------------------------------------------------------


def test_engines_merge_with_defaults(tmp_path: Path) -> None:
    c = load("engines:\n  acl: site.acl_v2\n  fancy: my_pkg.engines.fancy\n", tmp_path)
    assert c.engines["acl"] == "site.acl_v2"
    assert c.engines["fancy"] == "my_pkg.engines.fancy"
    assert c.engines["tcp"] == "engines.tcp"
    assert len(c.engines) == 10


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("engines:\n  acl: not-a.module\n", ":2: engines.acl: expected a dotted module path"),
        ("engines:\n  acl: a..b\n", "engines.acl: expected a dotted module path"),
        ("engines:\n  null: engines.null\n", "engines: expected engine names"),
        ("engines: [a]\n", "engines: expected a mapping"),
    ],
)
def test_bad_engines(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error(text, tmp_path)


def test_policies_structure_and_defaults(tmp_path: Path) -> None:
    c = load(
        """
engines: {fancy: my.fancy}
policies:
  - engine: ratelimit
    app: kv
    config: {rate: 100, burst: 10}
  - engine: acl
    side: receive
    method: Get
  - engine: fancy
    config:
""",
        tmp_path,
    )
    assert c.policies == (
        PolicyAttachment("ratelimit", "kv", "send", None, {"rate": 100, "burst": 10}),
        PolicyAttachment("acl", "*", "receive", "Get", {}),
        PolicyAttachment("fancy", "*", "send", None, {}),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("policies: {engine: acl}", ":1: policies: expected a list of policy attachments"),
        ("policies: [acl]", "policies[0]: expected a mapping, got 'acl'"),
        ("policies:\n  - app: kv", ":2: policies[0]: missing required key 'engine'"),
        (
            "policies:\n  - {engine: acl}\n  - {engine: acl, sid: send}",
            ":3: policies[1].sid: unknown key (did you mean 'side'?)",
        ),
        ("policies:\n  - engine: nope", ":2: policies[0].engine: expected an engine named in"),
        (
            "policies:\n  - engine: acl\n    side: both",
            ":3: policies[0].side: expected one of send, receive",
        ),
        ("policies:\n  - {engine: acl, app: ''}", "policies[0].app: expected an app name"),
        ("policies:\n  - {engine: acl, method: 3}", "policies[0].method: expected a method"),
        ("policies:\n  - {engine: acl, config: [1]}", "policies[0].config: expected a mapping"),
    ],
)
def test_bad_policies(tmp_path: Path, text: str, expected: str) -> None:
    msg = error(text + "\n", tmp_path)
    assert expected in msg, msg


# -- to_dict ----------------------------------------------------------------------


def test_to_dict_is_plain_data_that_loads_back(tmp_path: Path) -> None:
    c = load(
        "listen: '[::1]:7'\nmetrics: {listen: '127.0.0.1:9150'}\n"
        "policies: [{engine: qos, config: {weights: [1, 2]}}]\n",
        tmp_path,
    )
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["listen"] == "[::1]:7" and d["metrics"] == {"listen": "127.0.0.1:9150"}
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_config(path, env={}) == c
