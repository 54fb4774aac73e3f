"""``mrpcctl``: the operator CLI. Works by names (apps, engines), never by channel ids."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from libmrpc._control import open_control, request
from libmrpc._paths import check_daemon_peer, operator_socket_path, resolve_prefix
from libmrpc.status import RpcError


def _operator_socket(prefix: str | None) -> str:
    """The operator socket at ``prefix`` (checked: root's or ours, see libmrpc._paths)."""
    return operator_socket_path(resolve_prefix(prefix))


def _call(ctx: click.Context, msg: dict[str, Any]) -> dict[str, Any]:
    try:
        path = _operator_socket(ctx.obj["prefix"])
        with open_control(path) as sock:
            check_daemon_peer(sock, path)
            reply, _ = request(sock, msg)
    except RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from None
    reply.pop("ok", None)
    return reply


def _out(ctx: click.Context, data: dict[str, Any], text: str) -> None:
    if ctx.obj["json"]:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


@click.group()
@click.option(
    "--prefix",
    default=None,
    help="The daemon's prefix directory (default: MRPC_PREFIX or mrpcd's default).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def main(ctx: click.Context, prefix: str | None, as_json: bool) -> None:
    """Operate a running mrpcd."""
    ctx.ensure_object(dict)
    ctx.obj.update(prefix=prefix, json=as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Daemon status: pid, address, apps, runtimes, bind cache."""
    ctx.obj["json"] |= as_json
    r = _call(ctx, {"op": "status"})
    rts = ", ".join(f"{rt['name']}({rt['engines']} engines)" for rt in r["runtimes"])
    _out(
        ctx,
        r,
        f"mrpcd {r['version']} pid {r['pid']} listening on {r['listen']}\n"
        f"prefix {r['prefix']}  uptime {r['uptime_s']:.0f}s  apps {r['apps']}  "
        f"transport {r['transport']}\nruntimes {rts}\nbind cache {r['bind_cache']}"
        + (f"\ngc {_gc_line(r['gc'])}" if r.get("gc") else "")
        + (f"\nmetrics http://{r['metrics']}/metrics" if r.get("metrics") else ""),
    )


def _gc_line(g: dict[str, Any]) -> str:
    per_gen = ", ".join(
        f"gen{i} {n} ({t:.0f} ms, longest {m:.1f} ms)"
        for i, (n, t, m) in enumerate(zip(g["collections"], g["total_ms"], g["longest_ms"]))
    )
    return f"{g['frozen_objects']} start-up objects frozen; collections: {per_gen}"


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Applications, their datapaths (engines with ids) and connections."""
    ctx.obj["json"] |= as_json
    r = _call(ctx, {"op": "list"})
    lines = []
    for app in r["apps"]:
        lines.append(
            f"app {app['name']} (#{app['app_id']}, pid {app['pid']}, uid {app['uid']}) serves "
            f"{', '.join(app['serves']) or '-'}; {app['inflight_calls']} calls in flight"
        )
        for e in app["datapath"]:
            cfg = f" {e['config']}" if e["config"] else ""
            module = f" {e['module']}" if e.get("module") else ""
            lines.append(
                f"  engine {e['id']}  [{e['engine']} v{e['version']}{module}, {e['side']}"
                f"{', method ' + e['method'] if e['method'] else ''}]{cfg}"
            )
        for c in app["connections"]:
            lines.append(f"  connection {c['conn_id']} -> {c['addr']}")
    _out(ctx, r, "\n".join(lines) or "no applications")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def services(ctx: click.Context, as_json: bool) -> None:
    """Service names: the uid that owns each, and the app serving it now."""
    ctx.obj["json"] |= as_json
    r = _call(ctx, {"op": "services"})
    lines = []
    for s in r["services"]:
        by = s["served_by"]
        now = (
            f"served by app {by['app']} (#{by['app_id']}, pid {by['pid']}, uid {by['uid']})"
            if by
            else "not served"
        )
        rule = f"; rule {s['rule']}" if s["rule"] else ""
        lines.append(
            f"{s['service']}: owner uid {s['owner_uid']} (app {s['owner_app']}, pid {s['owner_pid']}); "
            f"{now}{rule}"
        )
    _out(ctx, r, "\n".join(lines) or "no services")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Per-engine counters."""
    ctx.obj["json"] |= as_json
    r = _call(ctx, {"op": "stats"})
    lines = []
    for app in r["apps"]:
        lines.append(f"app {app['app']} (pid {app['pid']})")
        for e in app["engines"]:
            counters = " ".join(f"{k}={v}" for k, v in e.get("stats", {}).items())
            lines.append(f"  {e.get('engine_id', '?')}: {counters}")
    lines.append("ingress: " + " ".join(f"{k}={v}" for k, v in r.get("ingress", {}).items()))
    _out(ctx, r, "\n".join(lines))


@main.group()
def schema() -> None:
    """Schema cache commands."""


@schema.command()
@click.argument("proto", type=click.Path(exists=True, dir_okay=False))
@click.option("-I", "--include", multiple=True, help="Import search directory.")
@click.pass_context
def prefetch(ctx: click.Context, proto: str, include: tuple[str, ...]) -> None:
    """Compile PROTO into the daemon's binding cache, so apps bind in milliseconds."""
    from libmrpc._schema import read_proto

    texts = read_proto(proto, include_dirs=include)
    r = _call(ctx, {"op": "schema_prefetch", "texts": texts})
    _out(
        ctx,
        r,
        f"schema {r['schema_hash']} ({', '.join(r['services'])}) {r['how']} in {r['bind_ms']} ms",
    )


def _parse_sets(pairs: tuple[str, ...]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}")
        config[key] = yaml.safe_load(value) if value else ""
    return config


@main.group()
def policy() -> None:
    """Attach, detach and reconfigure policy engines."""


@policy.command()
@click.argument("name", required=False)
@click.option("--app", "app", default=None, help="Application name or pid.")
@click.option("--all", "all_apps", is_flag=True, help="Every application.")
@click.option("--future", is_flag=True, help="Also apply to applications that register later.")
@click.option("--side", type=click.Choice(["send", "receive"]), default=None)
@click.option("--method", default=None, help="Only this method (name or /pkg.Service/Method).")
@click.option("--set", "sets", multiple=True, help="Config key=value (repeatable).")
@click.option(
    "--file",
    "spec_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A policy spec (policies/*.yaml).",
)
@click.option("--transient", is_flag=True, help="Do not record it: gone when the daemon restarts.")
@click.pass_context
def attach(
    ctx: click.Context,
    name: str | None,
    app: str | None,
    all_apps: bool,
    future: bool,
    side: str | None,
    method: str | None,
    sets: tuple[str, ...],
    spec_file: str | None,
    transient: bool,
) -> None:
    """Attach policy engine NAME to an application's datapath.

    Recorded under the prefix (an attach by pid under the app's name) and put back
    after a daemon restart, unless --transient."""
    spec: dict[str, Any] = {}
    if spec_file:
        spec = yaml.safe_load(Path(spec_file).read_text()) or {}
        if not isinstance(spec, dict):
            raise click.ClickException(f"{spec_file}: a policy spec must be a mapping")
    engine = name or spec.get("engine")
    if not engine:
        raise click.UsageError("name the engine (or give --file with an engine: key)")
    if not app and not all_apps:
        raise click.UsageError("say which application: --app NAME|PID or --all")
    config = dict(spec.get("config") or {})
    config.update(_parse_sets(sets))
    msg = {
        "op": "policy_attach",
        "engine": engine,
        "app": "*" if all_apps else app,
        "side": side or spec.get("side") or "send",
        "method": method or spec.get("method"),
        "config": config,
        "future": future,
        "transient": transient,
    }
    r = _call(ctx, msg)
    text = "\n".join(f"attached {eid}" for eid in r["engine_ids"]) or "attached to no running app"
    if r.get("rule_id"):
        text += f"\nstanding rule {r['rule_id']} applies to applications that register later"
    for p in r.get("persisted") or []:
        text += f"\nrecorded as {p['id']} for app {p['app']!r}: survives daemon restarts"
        text += f" ({p['note']})" if p.get("note") else ""
    if r.get("not_persisted"):
        text += f"\nnot recorded: {r['not_persisted']}"
    _out(ctx, r, text)


@policy.command()
@click.argument("engine_id", required=False)
@click.option("--app", default=None, help="Application name or pid (with --engine).")
@click.option("--engine", "engine", default=None, help="Engine name (with --app).")
@click.option("--rule", "rule_id", default=None, help="Remove a standing rule.")
@click.pass_context
def detach(
    ctx: click.Context,
    engine_id: str | None,
    app: str | None,
    engine: str | None,
    rule_id: str | None,
) -> None:
    """Detach ENGINE_ID (or every ENGINE of --app); queued RPCs are handed on, none lost."""
    if not (engine_id or rule_id or (app and engine)):
        raise click.UsageError("give ENGINE_ID, or --app and --engine, or --rule")
    r = _call(
        ctx,
        {
            "op": "policy_detach",
            "engine_id": engine_id,
            "app": app,
            "engine": engine,
            "rule_id": rule_id,
        },
    )
    lines = [
        f"detached {d['engine_id']} ({d['handed_on']} queued RPCs handed on)" for d in r["detached"]
    ]
    if r.get("rule_removed"):
        lines.append(f"removed standing rule {r['rule_removed']}")
    _out(ctx, r, "\n".join(lines))


@policy.command("set")
@click.argument("engine_id")
@click.argument("pairs", nargs=-1, required=True)
@click.pass_context
def set_(ctx: click.Context, engine_id: str, pairs: tuple[str, ...]) -> None:
    """Reconfigure ENGINE_ID in place: key=value ... (all or nothing)."""
    r = _call(ctx, {"op": "policy_set", "engine_id": engine_id, "config": _parse_sets(pairs)})
    lines = [f"updated {eid}: {r['config'][eid]}" for eid in r["updated"]]
    lines += [f"not recorded {eid}: {why}" for eid, why in r.get("not_recorded", {}).items()]
    _out(ctx, r, "\n".join(lines))


@policy.command()
@click.pass_context
def rules(ctx: click.Context) -> None:
    """Standing rules (applied to applications that register later)."""
    r = _call(ctx, {"op": "policy_rules"})
    _out(
        ctx,
        r,
        "\n".join(
            f"{x['rule_id']}: {x['engine']} on {x['app']} ({x['side']}) {x['config']}"
            for x in r["rules"]
        )
        or "no standing rules",
    )


@main.group()
def engine() -> None:
    """Upgrade, roll back and command engines of running datapaths."""


def _engine_lines(r: dict[str, Any], verb: str) -> str:
    lines = [
        f"{verb} {o['engine_id']} (app {o['app']}): v{o['from_version']} -> v{o['to_version']} "
        f"({o['module']}) in {o['ms']} ms"
        for o in r["engines"]
    ]
    return "\n".join(lines) or f"no running engine {r['engine']!r} matched"


@engine.command()
@click.argument("name")
@click.option("--module", "module", default=None, help="The new code as a module path (PKG.MOD).")
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The new code as a .py file.",
)
@click.option("--app", "app", default=None, help="Application name or pid.")
@click.option("--all", "all_apps", is_flag=True, help="Every application (and later ones).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def upgrade(
    ctx: click.Context,
    name: str,
    module: str | None,
    file: str | None,
    app: str | None,
    all_apps: bool,
    as_json: bool,
) -> None:
    """Swap engine NAME for new code, live, keeping its state; a refusal rolls back."""
    ctx.obj["json"] |= as_json
    if (module is None) == (file is None):
        raise click.UsageError("give the new code: --module PKG.MOD or --file PATH.py")
    if app and all_apps:
        raise click.UsageError("give --app NAME|PID or --all, not both")
    msg = {  # neither: the daemon asks which application (tcp-ingress has none)
        "op": "engine_upgrade",
        "engine": name,
        "module": module,
        "file": str(Path(file).resolve()) if file else None,
        "app": "*" if all_apps else app,
    }
    r = _call(ctx, msg)
    text = _engine_lines(r, "upgraded")
    if r.get("not_persisted"):
        text += f"\nnot recorded for the next start: {r['not_persisted']}"
    _out(ctx, r, text)


@engine.command()
@click.argument("name")
@click.option("--app", "app", default=None, help="Application name or pid (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def rollback(ctx: click.Context, name: str, app: str | None, as_json: bool) -> None:
    """Return engine NAME to the version it ran before its last upgrade."""
    ctx.obj["json"] |= as_json
    r = _call(ctx, {"op": "engine_rollback", "engine": name, "app": app or "*"})
    _out(ctx, r, _engine_lines(r, "rolled back"))


@engine.command("call")
@click.argument("engine_id")
@click.argument("op")
@click.argument("pairs", nargs=-1)
@click.pass_context
def call_(ctx: click.Context, engine_id: str, op: str, pairs: tuple[str, ...]) -> None:
    """Send command OP (key=value ...) to engine ENGINE_ID's handle_request."""
    r = _call(
        ctx, {"op": "engine_call", "engine_id": engine_id, "cmd": op, "args": _parse_sets(pairs)}
    )
    _out(ctx, r, json.dumps(r["result"], indent=2, default=str))


@policy.command("list")
@click.option("--persisted", is_flag=True, help="The record kept across daemon restarts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_policies(ctx: click.Context, persisted: bool, as_json: bool) -> None:
    """Policies recorded under the prefix (--persisted); attached engines: `mrpcctl list`."""
    ctx.obj["json"] |= as_json
    if not persisted:
        raise click.UsageError(
            "give --persisted (attached engines are in `mrpcctl list`, rules in `policy rules`)"
        )
    r = _call(ctx, {"op": "policy_list"})
    if not r["enabled"]:
        _out(ctx, r, "not recording: persist_policies is off in the daemon config")
        return
    lines = [
        f"{p['id']}: {p['engine']} on {p['app']} ({p['kind']}, {p['side']}"
        + (f", method {p['method']}" if p["method"] else "")
        + f") {p['config']}"
        + (f"  SKIPPED: {p['skipped']}" if p.get("skipped") else "")
        for p in r["policies"]
    ]
    lines += [f"engine {n}: module {m}" for n, m in r["engines"].items()]
    _out(ctx, r, "\n".join(lines) or f"nothing recorded in {r['path']}")


# ---------------------------------------------------------------- daemon restart (hot restart)


def _call_timeout(ctx: click.Context, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        path = _operator_socket(ctx.obj["prefix"])
        with open_control(path, timeout=timeout) as sock:
            check_daemon_peer(sock, path)
            reply, _ = request(sock, msg)
    except RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from None
    except TimeoutError:
        raise click.ClickException(
            f"DEADLINE_EXCEEDED: no answer from mrpcd within {timeout:g}s; see its log"
        ) from None
    reply.pop("ok", None)
    return reply


@main.group("daemon")
def daemon_group() -> None:
    """The daemon process itself."""


@daemon_group.command("restart")
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds the new process gets to take over (default: restart_timeout of the config).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def daemon_restart(ctx: click.Context, timeout: float | None, as_json: bool) -> None:
    """Hot restart: a new mrpcd from the installed code takes over apps, peer
    connections and calls in flight, then the old one exits; on failure the old
    one serves on and this says why."""
    ctx.obj["json"] |= as_json
    msg: dict[str, Any] = {"op": "daemon_restart"}
    if timeout is not None:
        msg["timeout"] = timeout
    r = _call_timeout(ctx, msg, (timeout or 600.0) + 10.0)
    _out(
        ctx,
        r,
        f"mrpcd restarted: pid {r['old_pid']} -> {r['new_pid']}; {r['apps']} apps, "
        f"{r['peer_connections']} peer connections handed over; calls paused "
        f"{r['stall_ms']} ms (new process ready after {r['startup_ms']} ms)",
    )


if __name__ == "__main__":
    sys.exit(main())
