"""The daemon's configuration: typed, frozen, validated in one place.

How this works: every key is one row of ``_KEYS`` (dotted path → parser, raw
default). Layers are applied in order of precedence, lowest first — embedded
defaults, the YAML file, ``MRPC_*`` environment variables, explicit overrides
(CLI flags) — and each value is parsed as soon as its layer sets it, so an error
names the layer it came from. ``engines`` merges entry by entry; every other key
is replaced. Cross-key checks (policy engine names, message size vs. heap size,
unix socket path length) run once at the end against the final values. An unset
``max_message_size`` shrinks to half the smaller shm heap if that is below 256MiB.

Value syntax, the same in every layer (YAML values may also be native types):

- sizes: a non-negative integer (bytes) or a string ``<integer><unit>`` with unit
  ``B``, ``K``/``KiB``, ``M``/``MiB``, ``G``/``GiB``, ``T``/``TiB``, case-insensitive,
  all powers of 1024 (``"4k"`` = 4096). ``KB``/``MB``/``GB`` are rejected as
  ambiguous. No fractions.
- booleans: ``1 0 true false yes no on off`` (case-insensitive).
- nullable keys: YAML ``null``, or the strings ``""``, ``null``, ``none``, ``~``.
- ``host:port``: IPv4, a hostname, or a bracketed IPv6 address (``[::1]:5150``);
  port 0..65535 (0 = pick a free port).
- ``prefix``: ``~`` is expanded; a relative prefix is made absolute against the
  current directory. ``app_socket``, ``operator_socket`` and ``cache_dir`` are
  relative to the prefix unless absolute, and are stored resolved.

Environment variables that start with ``MRPC_`` but name no key are ignored: the
namespace is shared with libmrpc. Override values of ``None`` mean "not given".
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from libmrpc._paths import default_prefix
from libmrpc.status import ConfigError
from mrpcd.engine.settings import LimitsConfig, TcpConfig

__all__ = [
    "AppsConfig",
    "Config",
    "LimitsConfig",
    "MetricsConfig",
    "PolicyAttachment",
    "SchemaConfig",
    "ServiceRule",
    "ShmConfig",
    "TcpConfig",
    "default_prefix",
    "env_var_name",
    "format_hostport",
    "load_config",
    "parse_hostport",
    "parse_size",
]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
MAX_UNIX_SOCKET_PATH = 107  # sun_path is 108 bytes including the NUL


@dataclass(frozen=True)
class ShmConfig:
    send_heap_size: int  # bytes, power of two
    recv_heap_size: int  # bytes, power of two
    ring_slots: int  # slots per submit/completion ring, power of two


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None  # Prometheus HTTP endpoint; None = off


@dataclass(frozen=True)
class SchemaConfig:
    max_bytes: int  # largest schema bundle (file names + texts, UTF-8) an app may bind
    max_per_app: int  # distinct schemas one app may bind
    compile_timeout: float  # seconds of wall-clock time for one compile (protoc + codegen)
    compile_memory: int  # address-space limit of the compile process, bytes
    compile_jobs: int  # compiles that may run at once
    keep_unused: int  # loaded schemas kept in memory after the last app holding them left
    cache_max_entries: int  # compiled schemas kept in cache_dir
    cache_max_bytes: int  # bytes of compiled schemas kept in cache_dir


@dataclass(frozen=True)
class PolicyAttachment:
    engine: str  # a name in Config.engines
    app: str  # app name, or "*" for every app including later ones
    side: str  # "send" or "receive"
    method: str | None  # only this method; None = every method
    config: Mapping[str, object]  # engine-specific, validated by the engine


@dataclass(frozen=True)
class AppsConfig:
    max: int  # registered applications at once, all users
    max_per_uid: int  # registered applications at once, per Unix user
    register_timeout: float  # seconds a new app connection has to register
    register_rate: float  # registrations per second one uid may make (burst: register_burst)
    register_burst: int  # registrations one uid may make at once before register_rate applies


@dataclass(frozen=True)
class ServiceRule:
    """Who may serve services whose name matches ``name`` ("pkg.Service", "pkg.*", "*")."""

    name: str
    uids: tuple[int | str, ...]  # uids or user names
    groups: tuple[int | str, ...]  # gids or group names (primary or supplementary)


@dataclass(frozen=True)
class Config:
    """The daemon configuration; build it with :func:`load_config`."""

    prefix: Path
    listen: tuple[str, int]
    transport: str
    log_level: str
    app_socket: Path  # absolute
    operator_socket: Path  # absolute
    operator_group: str | None
    cache_dir: Path  # absolute
    runtimes: int
    spin_us: int
    max_message_size: int
    max_metadata_size: int
    drain_timeout: float
    shm: ShmConfig
    tcp: TcpConfig
    metrics: MetricsConfig
    limits: LimitsConfig
    schema: SchemaConfig
    engines: Mapping[str, str]  # engine name -> module path; read-only
    policies: tuple[PolicyAttachment, ...]
    apps: AppsConfig
    services: tuple[ServiceRule, ...]
    persist_policies: bool = True  # record runtime policy changes under the prefix
    restart_timeout: float = 10.0  # hot restart: the new process restores within this

    def to_dict(self) -> dict[str, object]:
        """Plain JSON/YAML-able data; loading it as a config file gives this Config back."""
        d = dataclasses.asdict(self)
        for k in ("prefix", "app_socket", "operator_socket", "cache_dir"):
            d[k] = str(d[k])
        d["listen"] = format_hostport(*self.listen)
        d["metrics"]["listen"] = self.metrics.listen and format_hostport(*self.metrics.listen)
        d["policies"] = list(d["policies"])
        d["services"] = [
            dict(r, uids=list(r["uids"]), groups=list(r["groups"])) for r in d["services"]
        ]
        return d


class _Bad(Exception):
    """A value is wrong; the caller adds where it came from."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


def _expected(path: str, what: str, value: object) -> _Bad:
    return _Bad(path, f"expected {what}, got {value!r}")


def _fmt_size(n: int) -> str:
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")
_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "m": MiB,
    "mib": MiB,
    "g": GiB,
    "gib": GiB,
    "t": TiB,
    "tib": TiB,
}
_SIZE_WHAT = 'a size such as 1048576, "64MiB" or "4k"'


def _size_value(value: object, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _expected(path, "a non-negative size", value)
        return value
    m = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise _expected(path, _SIZE_WHAT, value)
    unit = m.group(2).lower()
    if unit not in _UNITS:
        hint = " (KB/MB/GB are ambiguous: write KiB/MiB/GiB)" if unit.endswith("b") else ""
        raise _expected(path, _SIZE_WHAT + hint, value)
    return int(m.group(1)) * _UNITS[unit]


def _size(lo: int, hi: int, *, pow2: bool = False) -> Callable[[object, str], int]:
    def parse(value: object, path: str) -> int:
        n = _size_value(value, path)
        if not lo <= n <= hi or (pow2 and n & (n - 1)):
            kind = "a power of two" if pow2 else "a size"
            raise _expected(path, f"{kind} between {_fmt_size(lo)} and {_fmt_size(hi)}", value)
        return n

    return parse


def _int(lo: int, hi: int, *, pow2: bool = False) -> Callable[[object, str], int]:
    kind = "a power of two" if pow2 else "an integer"

    def parse(value: object, path: str) -> int:
        n = value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            n = int(value)
        if (
            not isinstance(n, int)
            or isinstance(n, bool)
            or not lo <= n <= hi
            or (pow2 and n & (n - 1))
        ):
            raise _expected(path, f"{kind} between {lo} and {hi}", value)
        return n

    return parse


def _float(lo: float, hi: float, *, positive: bool = False) -> Callable[[object, str], float]:
    low = "greater than 0" if positive else f"at least {lo:g}"
    what = f"a number of seconds {low} and at most {hi:g}"

    def parse(value: object, path: str) -> float:
        try:
            x = float(value) if isinstance(value, (int, float, str)) else math.nan
        except ValueError:
            x = math.nan
        if isinstance(value, bool) or not lo <= x <= hi or (positive and x <= 0):
            raise _expected(path, what, value)
        return x

    return parse


_BOOLS = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(
    ("0", "false", "no", "off"), False
)


def _bool(value: object, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLS:
        return _BOOLS[value.strip().lower()]
    raise _expected(path, "a boolean (true/false, yes/no, on/off, 1/0)", value)


def _choice(*options: str) -> Callable[[object, str], str]:
    def parse(value: object, path: str) -> str:
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        raise _expected(path, "one of " + ", ".join(options), value)

    return parse


def _nullable(inner: Callable[[object, str], object]) -> Callable[[object, str], object]:
    def parse(value: object, path: str) -> object:
        if value is None or (
            isinstance(value, str) and value.strip().lower() in ("", "null", "none", "~")
        ):
            return None
        return inner(value, path)

    return parse


def _path(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _expected(path, "a non-empty path", value)
    return value


def _abspath(value: object, path: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(_path(value, path))))


def _group(value: object, path: str) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", value):
        return value
    raise _expected(path, "a group name (or null)", value)


_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_HOSTPORT_WHAT = 'host:port such as "127.0.0.1:5150" or "[::1]:5150"'


def _hostport(value: object, path: str) -> tuple[str, int]:
    if not isinstance(value, str):
        raise _expected(path, _HOSTPORT_WHAT + " (quote it in YAML)", value)
    s = value.strip()
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            sep = ""
    else:
        host, sep, port = s.rpartition(":")
        if ":" in host:
            raise _expected(path, _HOSTPORT_WHAT + " (IPv6 addresses need brackets)", value)
        if not _HOSTNAME.fullmatch(host):
            sep = ""
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise _expected(path, _HOSTPORT_WHAT + ", port 0..65535", value)
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets; the inverse of :func:`parse_hostport`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", re.ASCII)


def _mapping(value: object, path: str) -> Mapping[object, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _expected(path, "a mapping", value)
    return value


def _engines(value: object, path: str) -> dict[str, str]:
    out = {}
    for name, module in _mapping(value, path).items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _expected(path, "engine names that are identifiers", name)
        if not isinstance(module, str) or not _MODULE.fullmatch(module):
            raise _expected(f"{path}.{name}", 'a dotted module path like "engines.acl"', module)
        out[name] = module
    return out


_POLICY_KEYS = ("engine", "app", "side", "method", "config")


def _policies(value: object, path: str) -> tuple[PolicyAttachment, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _expected(path, "a list of policy attachments", value)
    out = []
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        item = _mapping(item, p)
        _check_known(item, _POLICY_KEYS, p + ".")
        if "engine" not in item:
            raise _Bad(p, "missing required key 'engine'")
        engine = item["engine"]
        if not isinstance(engine, str) or not _NAME.fullmatch(engine):
            raise _expected(f"{p}.engine", "an engine name", engine)
        app = item.get("app", "*")
        if not isinstance(app, str) or not app.strip():
            raise _expected(f"{p}.app", 'an app name or "*"', app)
        method = item.get("method")
        if method is not None and (not isinstance(method, str) or not method.strip()):
            raise _expected(f"{p}.method", "a method name (or leave it out)", method)
        config = _mapping(item.get("config"), f"{p}.config")
        if not all(isinstance(k, str) for k in config):
            raise _expected(f"{p}.config", "a mapping with string keys", config)
        side = _choice("send", "receive")(item.get("side", "send"), f"{p}.side")
        out.append(PolicyAttachment(engine, app, side, method, {str(k): config[k] for k in config}))
    return tuple(out)


_SERVICE_RULE_KEYS = ("name", "uids", "groups")
_SERVICE_NAME = re.compile(r"\*|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\.\*)?")
_ID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def _ids(value: object, path: str, what: str) -> tuple[int | str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _expected(path, f"a list of {what} ids or names", value)
    out: list[int | str] = []
    for i, v in enumerate(value):
        if (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32) or (
            isinstance(v, str) and _ID_NAME.fullmatch(v)
        ):
            out.append(v)
        else:
            raise _expected(f"{path}[{i}]", f"a {what} id or name", v)
    return tuple(out)


def _service_rules(value: object, path: str) -> tuple[ServiceRule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _expected(path, "a list of service rules", value)
    out = []
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        item = _mapping(item, p)
        _check_known(item, _SERVICE_RULE_KEYS, p + ".")
        name = item.get("name")
        if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
            raise _expected(f"{p}.name", 'a service name like "pkg.Service", "pkg.*" or "*"', name)
        out.append(
            ServiceRule(
                name,
                _ids(item.get("uids"), f"{p}.uids", "user"),
                _ids(item.get("groups"), f"{p}.groups", "group"),
            )
        )
    return tuple(out)


def _check_known(mapping: Mapping[object, object], known: tuple[str, ...], prefix: str) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _Bad(f"{prefix}{key}", f"unknown key{hint}; known keys: {', '.join(known)}")


_Parser = Callable[[object, str], object]
#: The engines shipped in ``engines/``, by name (operators may add or replace any).
#: Which are always on (frontend, transports) and which attachable is decided by
#: each engine's class, when the daemon loads it.
_SHIPPED_ENGINES = (
    "frontend",
    "tcp",
    "rdma",
    "null",
    "ratelimit",
    "acl",
    "qos",
    "metrics",
    "logging",
)
_KEYS: dict[str, tuple[_Parser, object]] = {
    "prefix": (_abspath, None),  # default from default_prefix()
    "listen": (_hostport, "127.0.0.1:5150"),
    "transport": (_choice("tcp", "rdma"), "tcp"),
    "log_level": (_choice("debug", "info", "warning", "error"), "info"),
    "app_socket": (_path, "app.sock"),
    "operator_socket": (_path, "ctl.sock"),
    "operator_group": (_nullable(_group), None),
    "cache_dir": (_path, "cache"),
    "runtimes": (_int(1, 64), 1),
    "spin_us": (_int(0, 100_000), 50),
    "max_message_size": (_size(KiB, TiB), "256MiB"),
    "max_metadata_size": (_size(64, 64 * KiB), "8KiB"),
    "drain_timeout": (_float(0.0, 3600.0), 5.0),
    "shm.send_heap_size": (_size(64 * KiB, 64 * GiB, pow2=True), "1GiB"),
    "shm.recv_heap_size": (_size(64 * KiB, 64 * GiB, pow2=True), "1GiB"),
    "shm.ring_slots": (_int(64, 1 << 20, pow2=True), 4096),
    "tcp.nodelay": (_bool, True),
    "tcp.connect_timeout": (_float(0.0, 600.0, positive=True), 3.0),
    "tcp.zero_copy_min": (_size(0, GiB), "2KiB"),
    "tcp.sndbuf": (_nullable(_size(KiB, 2**31 - 1)), None),
    "tcp.rcvbuf": (_nullable(_size(KiB, 2**31 - 1)), None),
    "tcp.max_connections_per_app": (_int(1, 1 << 20), 64),
    "tcp.max_inbound_connections": (_int(1, 1 << 20), 4096),
    "tcp.max_inbound_per_ip": (_int(1, 1 << 20), 512),
    "tcp.handshake_timeout": (_float(0.0, 3600.0, positive=True), 10.0),
    "tcp.header_timeout": (_float(0.0, 3600.0, positive=True), 10.0),
    "tcp.body_stall_timeout": (_float(0.0, 3600.0, positive=True), 30.0),
    "tcp.idle_timeout": (_float(0.0, 86400.0, positive=True), 300.0),
    "tcp.write_stall_timeout": (_float(0.0, 3600.0, positive=True), 30.0),
    "tcp.min_body_rate": (_size(0, 16 * GiB), "64KiB"),
    "tcp.max_send_queue": (_size(64 * KiB, 16 * GiB), "8MiB"),
    "tcp.max_calls_per_connection": (_int(1, 1 << 24), 4096),
    "tcp.max_reserved_per_connection": (_nullable(_size(KiB, 64 * GiB)), None),
    "metrics.listen": (_nullable(_hostport), None),
    "limits.calls_in_flight": (_int(1, 1 << 24), 4096),
    "limits.bytes_in_flight": (_size(MiB, TiB), "256MiB"),
    "limits.completion_backlog": (_int(1, 1 << 24), 4096),
    "limits.marshal_work": (_int(1024, 1 << 30), 1 << 18),
    "limits.slice_us": (_int(100, 10_000_000), 2000),
    "schema.max_bytes": (_size(KiB, 64 * MiB), "256KiB"),
    "schema.max_per_app": (_int(1, 4096), 16),
    "schema.compile_timeout": (_float(0.0, 3600.0, positive=True), 30.0),
    "schema.compile_memory": (_size(16 * MiB, TiB), "512MiB"),
    "schema.compile_jobs": (_int(1, 64), 2),
    "schema.keep_unused": (_int(0, 1 << 20), 32),
    "schema.cache_max_entries": (_int(0, 1 << 24), 256),
    "schema.cache_max_bytes": (_size(0, TiB), "256MiB"),
    "engines": (_engines, {n: f"engines.{n}" for n in _SHIPPED_ENGINES}),
    "policies": (_policies, []),
    "persist_policies": (_bool, True),
    "restart_timeout": (_float(0.5, 600.0), 10.0),
    "apps.max": (_int(1, 1_000_000), 1024),
    "apps.max_per_uid": (_int(1, 1_000_000), 128),
    "apps.register_timeout": (_float(0.0, 3600.0, positive=True), 10.0),
    "apps.register_rate": (_float(0.0, 1e6, positive=True), 50.0),
    "apps.register_burst": (_int(1, 1_000_000), 100),
    "services": (_service_rules, []),
}
_NO_ENV = ("engines", "policies", "services")
_SECTIONS: dict[str, tuple[str, ...]] = {}
for _key in _KEYS:
    if "." in _key:
        _section, _sub = _key.split(".")
        _SECTIONS[_section] = (*_SECTIONS.get(_section, ()), _sub)
_TOP = tuple(k for k in _KEYS if "." not in k) + tuple(_SECTIONS)


def env_var_name(key: str) -> str:
    """The environment variable that overrides dotted ``key``: ``MRPC_SHM_RING_SLOTS``."""
    return "MRPC_" + key.upper().replace(".", "_")


def _fixed(source: str) -> Callable[[str], str]:
    """A source that is the same for every key path in it."""
    return lambda _path: source


_DEFAULT = _fixed("default")


@contextmanager
def _blame(where: Callable[[str], str]) -> Iterator[None]:
    """Turn a :class:`_Bad` raised inside into a ConfigError naming its source."""
    try:
        yield
    except _Bad as e:
        raise ConfigError(f"{where(e.path)}: {e.path}: {e.message}") from None


def parse_size(value: object, *, key: str, source: str) -> int:
    """Bytes from an int or a string like ``"64MiB"`` or ``"4k"`` (see the module doc).

    Raises ConfigError naming ``source`` and ``key``."""
    with _blame(_fixed(source)):
        return _size_value(value, key)


def parse_hostport(value: object, *, key: str, source: str) -> tuple[str, int]:
    """``(host, port)`` from ``"host:port"`` or ``"[v6addr]:port"``; raises ConfigError."""
    with _blame(_fixed(source)):
        return _hostport(value, key)


def _read_yaml(path: Path) -> tuple[object, dict[str, int]]:
    """The file's data, and the line of each dotted key path (``policies[0].engine``)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, p: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                kp = f"{p}.{k.value}" if p else str(k.value)
                if kp in lines:
                    raise ConfigError(f"{path}:{k.start_mark.line + 1}: {kp}: duplicate key")
                lines[kp] = k.start_mark.line + 1
                walk(v, kp)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[f"{p}[{i}]"] = v.start_mark.line + 1
                walk(v, f"{p}[{i}]")

    if node is not None:
        walk(node, "")
    return data, lines


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Defaults, then the YAML file at ``path``, then ``MRPC_*`` from ``env``
    (``None`` = ``os.environ``), then dotted-key ``overrides`` (CLI flags).

    Raises ConfigError naming the key, where the value came from and what is
    expected; nothing is left half-applied (nothing is created on disk)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, Callable[[str], str]] = {}

    def put(key: str, value: object, where: Callable[[str], str]) -> None:
        with _blame(where):
            parsed = _KEYS[key][0](value, key)
        if key == "engines":
            parsed = {**values.get("engines", {}), **cast(dict[str, str], parsed)}
        values[key], sources[key] = parsed, where

    for key, (_, default) in _KEYS.items():
        put(key, str(default_prefix(env)) if key == "prefix" else default, _DEFAULT)

    if path is not None:
        file = Path(path)
        data, lines = _read_yaml(file)

        def at(p: str) -> str:  # the line of p or of its nearest ancestor
            while p and p not in lines:
                p = p[: max(p.rfind("."), p.rfind("["), 0)]
            return f"{file}:{lines[p]}" if p else str(file)

        with _blame(at):
            top = _mapping(data, "(top level)")
            _check_known(top, _TOP, "")
            for name, value in top.items():
                if name not in _SECTIONS:
                    put(str(name), value, at)
                    continue
                section = _mapping(value, str(name))
                _check_known(section, _SECTIONS[str(name)], f"{name}.")
                for sub, subvalue in section.items():
                    put(f"{name}.{sub}", subvalue, at)

    for key in _KEYS:
        var = env_var_name(key)
        if key not in _NO_ENV and var in env:
            put(key, env[var], _fixed(f"environment variable {var}"))

    cli = _fixed("command line")
    for key, value in (overrides or {}).items():
        with _blame(cli):
            _check_known({key: value}, tuple(_KEYS), "")
        if value is not None:
            put(key, value, cli)
    return _finish(values, sources)


def _finish(v: dict[str, Any], sources: dict[str, Callable[[str], str]]) -> Config:
    prefix: Path = v["prefix"]
    for key in ("app_socket", "operator_socket", "cache_dir"):
        v[key] = prefix / v[key]
    for key in ("app_socket", "operator_socket"):
        n = len(os.fsencode(v[key]))
        if n > MAX_UNIX_SOCKET_PATH:
            blame = "prefix" if sources[key] is _DEFAULT else key
            raise ConfigError(
                f"{sources[blame](blame)}: {blame}: {key} '{v[key]}' is {n} bytes; unix "
                f"sockets allow at most {MAX_UNIX_SOCKET_PATH}: choose a shorter path"
            )
    half_heap = min(v["shm.send_heap_size"], v["shm.recv_heap_size"]) // 2
    if sources["max_message_size"] is _DEFAULT:
        v["max_message_size"] = min(v["max_message_size"], half_heap)
    elif v["max_message_size"] > half_heap:
        raise ConfigError(
            f"{sources['max_message_size']('max_message_size')}: max_message_size: expected "
            f"at most half the smaller shm heap ({_fmt_size(half_heap)}), "
            f"got {_fmt_size(v['max_message_size'])}"
        )
    known = sorted(v["engines"])
    for i, pol in enumerate(v["policies"]):
        if pol.engine not in known:  # always-on engines are refused when loaded (by class)
            p = f"policies[{i}].engine"
            raise ConfigError(
                f"{sources['policies'](p)}: {p}: expected an engine named in `engines` "
                f"({', '.join(known)}), got {pol.engine!r}"
            )
    sections = {s: {k: v.pop(f"{s}.{k}") for k in keys} for s, keys in _SECTIONS.items()}
    return Config(
        **v,
        shm=ShmConfig(**sections["shm"]),
        tcp=TcpConfig(**sections["tcp"]),
        metrics=MetricsConfig(**sections["metrics"]),
        limits=LimitsConfig(**sections["limits"]),
        apps=AppsConfig(**sections["apps"]),
        schema=SchemaConfig(**sections["schema"]),
    )
