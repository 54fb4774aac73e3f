"""The ``acl`` policy: allow or deny calls by method and by request field values.

How this works
--------------
Config::

    default: allow                # or deny: what happens when no rule matches
    rules:
      - name: block-admin         # required, unique; named in error messages
        action: deny              # allow | deny (required)
        method: "/kv.KV/*"        # optional: method name, "/svc/Method" path or a glob
        field: "user.name"        # optional dotted path into the request message
        equals: "admin"           # with field, exactly one of: equals | prefix | regex | in
      - name: need-token
        action: allow
        metadata: authorization   # optional, instead of field: a call metadata key
        equals: "Bearer s3cret"   # the key's first value (bytes of -bin keys as UTF-8)

A ``metadata`` rule reads the call's metadata (``rpc.metadata``, checked by the
frontend): a call without the key does not match (counted as
``metadata_missing``), and a denial never shows the value (it may be a secret).

Rules are tried in order; the first rule whose method pattern and field test
both match decides; otherwise ``default`` decides. A denied call fails with
PERMISSION_DENIED naming the policy, the rule, the method and the value read.

Field values come from ``rpc.view()``, which the datapath gives content
policies over daemon-private memory. Each value read is copied at once into a
Python ``str`` (``bytes`` fields are decoded as UTF-8 with ``surrogateescape``,
integers in decimal, booleans as ``true``/``false``), and all matchers compare
that text, so ``equals: 42`` matches an int field of 42 and a string field
"42". ``regex`` is *searched* in the value (anchor it with ``^...$`` for a
whole-value match). Each field is read at most once per call.

Failure policy: a rule whose field is not on the message type (or a call that
carries no message) does not match and is counted as ``field_missing`` -- with
``default: deny`` and allow rules that fails closed, with a deny-list it fails
open, so check ``field_missing`` after attaching. A call marshalled before the
policy was attached (held meanwhile by a delay-mode ratelimit or qos) is copied
into daemon-private memory when it arrives and checked like any other; one that
cannot be copied fails with UNAVAILABLE, never passes unchecked. A field that exists but
cannot be read (malformed content, e.g. invalid UTF-8 in a ``string`` field)
fails the call with INVALID_ARGUMENT: malformed input never slips past a rule.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from libmrpc.status import ConfigError, StatusCode
from mrpcd.engine import EngineContext, PolicyEngine, Reject, Rpc, RpcKind, Verdict, make_private

FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
MATCHERS = ("equals", "prefix", "regex", "in")
RULE_KEYS = frozenset({"name", "action", "method", "field", "metadata", *MATCHERS})
METADATA_KEY = re.compile(r"[0-9a-z_.\-]+")
KEYS = frozenset({"default", "rules"})
_MISSING = object()


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    allow: bool
    method: re.Pattern[str] | None  # compiled glob, tried on name, path and service/name
    field: tuple[str, ...] | None
    test: Callable[[str], bool] | None  # on the value's text
    metadata: str | None = None  # a metadata key, read instead of a field


def _text(value: object) -> str | None:
    """The comparable text of a scalar field value (a private copy), None if not scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, float):
        return repr(value)
    return None


def _compile_rule(rule: Mapping[str, Any]) -> _Rule:
    method = rule["method"]
    pattern = re.compile(fnmatch.translate(method)) if method is not None else None
    field = tuple(rule["field"].split(".")) if rule["field"] is not None else None
    test: Callable[[str], bool] | None = None
    if "equals" in rule:
        expected = _text(rule["equals"])
        test = lambda s: s == expected
    elif "in" in rule:
        test = frozenset(_text(v) for v in rule["in"]).__contains__
    elif "prefix" in rule:
        prefix = rule["prefix"]
        test = lambda s: s.startswith(prefix)
    elif "regex" in rule:
        search = re.compile(rule["regex"]).search
        test = lambda s: search(s) is not None
    return _Rule(
        rule["name"], rule["action"] == "allow", pattern, field, test, rule.get("metadata")
    )


class Acl(PolicyEngine):
    """Access control on method and request content; see the module docstring."""

    NAME = "acl"
    VERSION = 1
    READS_CONTENT = True

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.counters.update(
            {"allowed": 0, "denied": 0, "field_missing": 0, "read_errors": 0, "metadata_missing": 0}
        )
        self._rules = [_compile_rule(r) for r in self.config["rules"]]
        self._hits: dict[str, int] = {r.name: 0 for r in self._rules}

    # ------------------------------------------------------------------ config

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The complete config (rules normalized); ``ConfigError`` names rule, key and value."""
        out = cls.common_config(config, KEYS)
        default = config.get("default", "allow")
        if default not in ("allow", "deny"):
            raise ConfigError(f"{cls.NAME}: default: expected allow or deny, got {default!r}")
        out["default"] = default
        rules = config.get("rules", [])
        if not isinstance(rules, list):
            raise ConfigError(f"{cls.NAME}: rules: expected a list of rules, got {rules!r}")
        out["rules"], names = [], set()
        for i, rule in enumerate(rules):
            checked = cls._validate_rule(i, rule)
            if checked["name"] in names:
                raise ConfigError(
                    f"{cls.NAME}: rules[{i}].name: {checked['name']!r} is used "
                    f"twice; rule names must be unique"
                )
            names.add(checked["name"])
            out["rules"].append(checked)
        return out

    @classmethod
    def _validate_rule(cls, i: int, rule: object) -> dict[str, Any]:
        where = f"{cls.NAME}: rules[{i}]"
        if not isinstance(rule, Mapping):
            raise ConfigError(f"{where}: expected a mapping with name and action, got {rule!r}")
        unknown = sorted(map(str, set(rule) - RULE_KEYS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; expected "
                f"{', '.join(sorted(RULE_KEYS))}"
            )
        name = rule.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: required, a non-empty string; got {name!r}")
        where = f"{cls.NAME}: rule {name!r}"
        if rule.get("action") not in ("allow", "deny"):
            raise ConfigError(
                f"{where}: action: expected allow or deny, got {rule.get('action')!r}"
            )
        out: dict[str, Any] = {
            "name": name,
            "action": rule["action"],
            "method": rule.get("method"),
            "field": rule.get("field"),
        }
        if out["method"] is not None and (not isinstance(out["method"], str) or not out["method"]):
            raise ConfigError(
                f"{where}: method: expected a method name, path or glob like "
                f'"/kv.KV/*", got {out["method"]!r}'
            )
        key = rule.get("metadata")
        if key is not None:
            if out["field"] is not None:
                raise ConfigError(f"{where}: give field or metadata, not both")
            if not isinstance(key, str) or not METADATA_KEY.fullmatch(key):
                raise ConfigError(
                    f"{where}: metadata: expected a lowercase metadata key like "
                    f"authorization, got {key!r}"
                )
            out["metadata"] = key
        field = out["field"] if key is None else key
        if (
            key is None
            and field is not None
            and (not isinstance(field, str) or not FIELD_PATH.fullmatch(field))
        ):
            raise ConfigError(
                f"{where}: field: expected a dotted field path like user.name, got {field!r}"
            )
        used = [m for m in MATCHERS if m in rule]
        if field is None and used:
            raise ConfigError(f"{where}: {used[0]}: needs a field to compare")
        if field is not None and len(used) != 1:
            raise ConfigError(
                f"{where}: expected exactly one of {', '.join(MATCHERS)} "
                f"with field {field!r}, got {used or 'none'}"
            )
        for m in used:
            out[m] = cls._validate_matcher(where, m, rule[m])
        return out

    @staticmethod
    def _validate_matcher(where: str, kind: str, value: object) -> object:
        scalar = (str, int, bool)
        if kind == "equals" and not isinstance(value, scalar):
            raise ConfigError(
                f"{where}: equals: expected a string, integer or boolean, got {value!r}"
            )
        if kind in ("prefix", "regex") and not isinstance(value, str):
            raise ConfigError(f"{where}: {kind}: expected a string, got {value!r}")
        if kind == "regex":
            try:
                re.compile(str(value))
            except re.error as exc:
                raise ConfigError(
                    f"{where}: regex: {value!r} is not a valid regular expression: {exc}"
                ) from None
        if kind == "in":
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, scalar) for v in value)
            ):
                raise ConfigError(
                    f"{where}: in: expected a non-empty list of strings, integers "
                    f"or booleans, got {value!r}"
                )
            return list(value)
        return value

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Replace keys given (``rules`` as a whole), all or nothing; rule hit counts persist."""
        merged = dict(self.config)
        merged.update(config)
        checked = self.validate_config(merged)
        rules = [_compile_rule(r) for r in checked["rules"]]
        self.config, self._rules = checked, rules
        self._hits = {r.name: self._hits.get(r.name, 0) for r in rules}

    # ------------------------------------------------------------------ decisions

    def on_call(self, rpc: Rpc) -> Verdict | Reject:
        names = None
        if rpc.method is not None:
            m = rpc.method
            names = (m.path, m.name, f"{m.service}/{m.name}")
        values: dict[tuple[str, ...], object] = {}  # field -> private text copy, read once
        for rule in self._rules:
            if rule.method is not None and (
                names is None or not any(rule.method.match(n) for n in names)
            ):
                continue
            text = None
            if rule.metadata is not None:
                found = next((v for k, v in rpc.metadata if k == rule.metadata), None)
                if found is None:
                    self.counters["metadata_missing"] += 1
                    continue
                if rule.test is not None and not rule.test(_text(found) or ""):
                    continue
            elif rule.field is not None:
                if rule.field not in values:
                    try:
                        values[rule.field] = self._read(rpc, rule.field)
                    except LookupError as exc:  # could not be checked: fails closed
                        self.counters["read_errors"] += 1
                        return Reject(
                            StatusCode.UNAVAILABLE,
                            f"policy {self.ctx.engine_id} could not check {self._path(rpc)}: "
                            f"{exc}; the call was not sent, retry it",
                        )
                    except Exception as exc:  # noqa: BLE001 - malformed content fails closed
                        self.counters["read_errors"] += 1
                        return Reject(
                            StatusCode.INVALID_ARGUMENT,
                            f"policy {self.ctx.engine_id} could not read field "
                            f"{'.'.join(rule.field)} of {self._path(rpc)}: {exc}; "
                            f"the request is malformed",
                        )
                value = values[rule.field]
                if value is _MISSING:
                    self.counters["field_missing"] += 1
                    continue
                text = str(value)
                if rule.test is not None and not rule.test(text):
                    continue
            self._hits[rule.name] += 1
            return self._verdict(rpc, rule.allow, rule, text)
        return self._verdict(rpc, self.config["default"] == "allow", None, None)

    @staticmethod
    def _read(rpc: Rpc, path: tuple[str, ...]) -> object:
        """The field's text copy, or ``_MISSING`` when the message has no such field.

        Raises ``LookupError`` when a call's message cannot be read privately:
        a content policy never passes a call it could not check."""
        if not make_private(rpc):  # marshalled before this policy was attached: copy it now
            if rpc.kind is RpcKind.CALL:
                raise LookupError("its request has no daemon-private copy to check")
            return _MISSING  # an error reply carries no message
        try:
            value = rpc.view()
        except LookupError:  # the call carries no message
            return _MISSING
        try:
            for part in path:
                value = getattr(value, part)
        except AttributeError:  # no such field on this message type
            return _MISSING
        text = _text(value)
        return _MISSING if text is None else text

    @staticmethod
    def _path(rpc: Rpc) -> str:
        return rpc.method.path if rpc.method is not None else "<unknown method>"

    def _verdict(
        self, rpc: Rpc, allow: bool, rule: _Rule | None, text: str | None
    ) -> Verdict | Reject:
        if allow:
            self.counters["allowed"] += 1
            return Verdict.PASS
        self.counters["denied"] += 1
        eid = self.ctx.engine_id
        if rule is None:
            why = f"denied by policy {eid} (default deny): {self._path(rpc)} matched no allow rule"
        else:
            why = f"denied by policy {eid} rule '{rule.name}': {self._path(rpc)}"
            if rule.metadata is not None:
                why += f" (metadata {rule.metadata!r})"
            if rule.field is not None and text is not None:
                shown = text if len(text) <= 64 else text[:64] + "..."
                why += f" {'.'.join(rule.field)}={shown!r}"
        return Reject(
            StatusCode.PERMISSION_DENIED,
            f"{why}; ask the operator to change the policy if this call should be "
            f"allowed (`mrpcctl list` shows the rules of {eid})",
        )

    # ------------------------------------------------------------------ state

    def statistics(self) -> dict[str, int | float]:
        stats: dict[str, int | float] = dict(self.counters)
        stats.update({f"rule:{name}": n for name, n in self._hits.items()})
        return stats

    def decompose(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "hits": dict(self._hits)}

    def load_state(self, state: Mapping[str, Any], prev_version: int) -> None:
        super().load_state(state, prev_version)
        for name, n in state.get("hits", {}).items():
            if name in self._hits:
                self._hits[name] = int(n)

    def handle_request(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """``stats`` -> counters and per-rule hits; ``rules`` -> rules with their hit counts."""
        op = cmd.get("op")
        if op == "stats":
            return {"engine": self.NAME, "id": self.ctx.engine_id, "stats": self.statistics()}
        if op == "rules":
            return {
                "default": self.config["default"],
                "rules": [dict(r, hits=self._hits[r["name"]]) for r in self.config["rules"]],
            }
        return super().handle_request(cmd)


ENGINE = Acl
