"""The daemon process: control sockets, application lifecycle, runtimes.

Threads: one event loop for all application control sockets and a few workers
for its slow operations (``mrpcd.control_loop``; end of stream on an app's
socket means the application is gone, whatever the cause, and triggers its
cleanup), an accept thread for the operator socket with a thread per operator
connection, and the runtimes. Everything that touches a datapath runs on that
datapath's runtime via ``Runtime.call``.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libmrpc._control import error_reply, peer_credentials, peer_groups, recv_msg, send_msg
from libmrpc._paths import daemon_state
from libmrpc._schema import cache_key_for
from libmrpc._shm import ShmLayout, create_regions, drain
from libmrpc.status import ConfigError, LocalError, MrpcError, RpcError, StatusCode
from libmrpc.wire import marshal as marshal_rt
from mrpcd import VERSION
from mrpcd.accept import OUT_OF_FDS, accept_loop
from mrpcd.appstate import AppState, Router
from mrpcd.binding import BindingCache, check_texts
from mrpcd.config import Config, format_hostport, parse_hostport
from mrpcd.control_loop import AppConn, ControlLoop
from mrpcd.datapath import Datapath
from mrpcd.engine import (
    Binding,
    ConnSpec,
    EngineContext,
    FrontendEngine,
    IngressEngine,
    MonotonicClock,
    Rpc,
    Services,
    TransportEngine,
)
from mrpcd.metrics_http import new_registry
from mrpcd.prefix import ensure_dir, open_file, unix_listener, write_file
from mrpcd.registry import EngineRegistry, load_engine_class
from mrpcd.runtime import Runtime
from mrpcd.services import Claimant, ServicePolicy

if TYPE_CHECKING:
    from mrpcd.hotrestart import Inherited
    from mrpcd.notify import Notifier
    from mrpcd.operator import OperatorHandler

log = logging.getLogger(__name__)


def _unix_listener(path: Path, mode: int, group: str | None = None) -> socket.socket:
    return unix_listener(path, mode, group)


class Daemon:
    def __init__(self, config: Config, inherited: Inherited | None = None) -> None:
        """``inherited``: a hot restart's new daemon takes the old one's lock and
        listening sockets (``mrpcd/hotrestart.py``) instead of making its own."""
        self.config = config
        self.clock = MonotonicClock()
        self.started = time.time()
        self.prefix = config.prefix
        self._inherited = inherited
        # hot restart (mrpcd/hotrestart.py): a restart under way, the handed-over state
        self.restarting = False
        self.handed_over = False
        self.successor_pid = 0
        self.pending_stop = False  # SIGTERM during a hot restart: passed on to the successor
        self.notifier: Notifier | None = None  # set by ``mrpcd run`` for the hot restart
        ensure_dir(self.prefix, 0o755, "prefix")
        self._lock_fd = inherited.lock_fd if inherited is not None else self._lock_prefix()
        try:
            self._setup(config)
        except BaseException:
            if inherited is None:  # the old daemon still owns an inherited prefix
                self._release_prefix()  # a failed start leaves no socket, lock or thread behind
            raise

    def _setup(self, config: Config) -> None:
        self.layout = ShmLayout(
            config.shm.ring_slots, config.shm.send_heap_size, config.shm.recv_heap_size
        )
        self.bindings = BindingCache(config.cache_dir, config.schema)
        self.registry = EngineRegistry(config.engines)
        self.runtimes = [
            Runtime(f"rt{i}", self.clock, spin_us=config.spin_us) for i in range(config.runtimes)
        ]
        self.apps: dict[int, AppState] = {}
        self.apps_lock = threading.Lock()
        self._app_ids = itertools.count(1)
        self._stopping = threading.Event()
        self.draining = False
        self._threads: list[threading.Thread] = []
        self.listener = (
            inherited.listener if (inherited := self._inherited) else self._tcp_listener()
        )
        self.listen_addr = format_hostport(*self.listener.getsockname()[:2])
        self.name = f"{socket.gethostname()}/{self.listen_addr}"
        self.router = Router(self.name)
        self.services = Services(
            daemon_name=self.name,
            max_message_size=config.max_message_size,
            max_metadata_size=config.max_metadata_size,
            tcp=config.tcp,
            limits=config.limits,
            router=self.router,
            metrics_registry=new_registry(),
        )
        marshal_rt.set_work_limit(config.limits.marshal_work)
        self._app_socks: dict[int, socket.socket] = {}
        self.frontend_cls = self._role("frontend", "frontend", FrontendEngine)
        self.transport_cls = self._role(config.transport, "transport", TransportEngine)
        self.ingress: IngressEngine | None = None
        self.app_sock_path = config.app_socket
        self.op_sock_path = config.operator_socket
        if inherited is not None:
            self.app_listener, self.op_listener = inherited.app_listener, inherited.op_listener
        else:
            self.app_listener = _unix_listener(self.app_sock_path, 0o666)
            self.op_listener = _unix_listener(
                self.op_sock_path, 0o660 if config.operator_group else 0o600, config.operator_group
            )
        self.operator: OperatorHandler | None = None  # set in start(): the operator command handler
        self.control = ControlLoop(
            self.app_listener, self._app_request, self._app_gone, config.apps.register_timeout
        )
        # admission and service ownership (apps.*, services)
        self.service_policy = ServicePolicy(config.services)
        self._claimants: dict[int, Claimant] = {}  # app_id -> its credentials
        self._registering: dict[int, int] = {}  # uid -> registrations under way
        self._register_tokens: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when)

    def _role(self, name: str, key: str, role: type[Any]) -> type[Any]:
        """The engine class configured as ``name``, checked to play ``role``."""
        cls = self.registry.get(name)
        if not issubclass(cls, role):
            raise ConfigError(
                f"{key}: engine {name!r} ({cls.__module__}.{cls.__qualname__}) is not a "
                f"{role.__name__}; name an engine of that role"
            )
        return cls

    def _lock_prefix(self) -> int:
        """Hold ``PREFIX/mrpcd.lock`` for our lifetime: one daemon per prefix."""
        fd = open_file(self.prefix / "mrpcd.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = daemon_state(self.prefix).get("pid", "?")
            raise LocalError(
                f"another mrpcd (pid {other}) already runs with prefix {self.prefix}; "
                f"stop it or choose another --prefix"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.prefix / "mrpcd.lock").st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the daemon that held it removed it on exit: lock the new file instead
            os.close(fd)
            return self._lock_prefix()
        return fd

    def _release_prefix(self) -> None:
        """Undo a failed ``__init__``/``start``: close what exists, remove the prefix's files."""
        for rt in getattr(self, "runtimes", ()):
            try:
                rt.stop()
            except Exception:
                log.exception("stopping runtime %s after a failed start failed", rt.name)
        for name in ("app_listener", "op_listener", "listener"):
            sock = getattr(self, name, None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes an accept thread blocked on it
                except OSError:
                    pass
                sock.close()
        operator = getattr(self, "operator", None)
        if operator is not None:
            operator.stop()
        paths = [self.prefix / "mrpcd.json"]
        if hasattr(self, "app_listener"):
            paths.append(self.app_sock_path)
        if hasattr(self, "op_listener"):
            paths.append(self.op_sock_path)
        self._unlink_and_unlock(paths)

    def _unlink_and_unlock(self, paths: list[Path]) -> None:
        for p in [*paths, self.prefix / "mrpcd.lock"]:  # the lock file last, while still held
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        os.close(self._lock_fd)

    def _tcp_listener(self) -> socket.socket:
        host, port = self.config.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise LocalError(
                f"cannot listen on {format_hostport(host, port)}: {e.strerror}; "
                f"choose another address with --listen or MRPC_LISTEN"
            ) from None
        sock.listen(1024)
        return sock

    # ------------------------------------------------------------------ start/stop

    def start(self) -> None:
        from mrpcd.operator import OperatorHandler

        try:
            self._start(OperatorHandler)
        except BaseException:
            self._release_prefix()
            raise

    def _start(self, operator_cls: Any) -> None:
        self.operator = operator_cls(self)
        self._make_ingress()
        self._go()

    def _make_ingress(self) -> None:
        rt0 = self.runtimes[0]
        ingress_cls = load_engine_class(
            self.config.engines.get(self.config.transport, "engines.tcp"),
            name="tcp-ingress",
            attr="INGRESS",
        )
        if not issubclass(ingress_cls, IngressEngine):
            raise ConfigError(f"{self.config.transport}: its INGRESS is not an IngressEngine")
        ctx = EngineContext(
            "daemon/tcp-ingress",
            "",
            0,
            self.clock,
            services=self.services,
            poller=rt0.poller,
            wake=rt0.wake_soon,
            listener=self.listener,
        )
        self.ingress = ingress_cls(ctx, {})
        self.ingress.lifecycle("attach")
        rt0.add_engine(self.ingress)

    def _go(self) -> None:
        """Start the threads: runtimes, the control loop, operator accepts, metrics."""
        assert self.operator is not None
        for rt in self.runtimes:
            rt.start()
        self.control.start()
        t = threading.Thread(target=self._accept_operators, name="mrpcd-ops", daemon=True)
        t.start()
        self._threads.append(t)
        if self._inherited is None:
            self.operator.start_metrics()
        else:  # a hot restart's new process: it serves already, metrics or not
            try:
                self.operator.start_metrics()
            except OSError as e:
                log.error("hot restart: the metrics endpoint did not start: %s", e)
        self._write_state_file()
        log.info(
            "mrpcd %s ready: listening on %s, prefix %s", VERSION, self.listen_addr, self.prefix
        )

    def _write_state_file(self) -> None:
        state = {
            "pid": os.getpid(),
            "listen": self.listen_addr,
            "app_socket": str(self.app_sock_path),
            "operator_socket": str(self.op_sock_path),
            "prefix": str(self.prefix),
            "version": VERSION,
            "metrics": self.operator.metrics_addr if self.operator else None,
        }
        write_file(self.prefix / "mrpcd.json", json.dumps(state, indent=2).encode(), 0o644)

    def inflight(self) -> int:
        """Calls the daemon owes an answer: taken from a ring, posted on one and not
        yet taken (an app's submit ring is read racily here; a corrupt one counts 0)."""
        with self.apps_lock:
            apps = list(self.apps.values())
        return sum(len(a.inflight) + len(a.server_calls) + _posted(a) for a in apps)

    def drain(self, timeout: float) -> bool:
        """Stop taking new apps; wait until every call posted before now is answered.
        True when all finished."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inflight() == 0 and self._runtimes_settled(deadline):
                return True
            time.sleep(0.01)
        return self.inflight() == 0

    def _runtimes_settled(self, deadline: float) -> bool:
        """A runtime may be between releasing a call and posting its completion:
        one no-op round on every runtime lets that work end; then count again."""
        for rt in self.runtimes:
            try:
                rt.call(_nothing, timeout=max(0.01, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a stuck runtime: the drain times out
                return False
        return self.inflight() == 0

    def stop(self) -> None:
        self._stopping.set()
        self.control.stop()
        for s in (self.app_listener, self.op_listener):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self.apps_lock:
            apps = list(self.apps.values())
        for app in apps:
            self._cleanup(app, "daemon stopping")
        rt0 = self.runtimes[0]
        if self.ingress is not None:
            rt0.call(self.ingress.close)
        for rt in self.runtimes:
            rt.stop()
        self.listener.close()
        if self.operator is not None:
            self.operator.stop()
        self._unlink_and_unlock([self.app_sock_path, self.op_sock_path, self.prefix / "mrpcd.json"])

    def wait(self) -> None:
        self._stopping.wait()

    # ------------------------------------------------------------------ sockets

    def _accept_operators(self) -> None:
        self._accept_loop(self.op_listener, self._serve_operator, "operator")

    def _accept_loop(self, listener: socket.socket, serve: Any, what: str) -> None:
        accept_loop(listener, serve, what, self._stopping)

    def _serve_operator(self, sock: socket.socket) -> None:
        assert self.operator is not None
        with sock:
            try:
                _pid, uid, gid = peer_credentials(sock)
                refusal = self.operator.refuse(uid, gid, peer_groups(sock))
                while True:
                    try:
                        msg, fds = recv_msg(sock)
                    except ValueError as e:
                        send_msg(
                            sock,
                            refusal
                            or error_reply(
                                StatusCode.INVALID_ARGUMENT, f"bad operator message: {e}"
                            ),
                        )
                        if refusal:
                            return
                        continue
                    for fd in fds:
                        os.close(fd)
                    if msg is None:
                        return
                    reply = refusal or self._operate(msg)
                    try:
                        send_msg(sock, reply)
                    except RpcError as e:  # a reply too large for one control packet
                        send_msg(
                            sock,
                            error_reply(
                                e.code(),
                                f"the reply to {msg.get('op')!r} is too "
                                f"large: {e.details()}; ask for less",
                            ),
                        )
                    if self.handed_over:  # the restart's answer is out: the next daemon serves
                        self.exit_handed_over()
                    if refusal:
                        return
            except OSError as e:
                log.info("operator connection ended: %s", e)

    def _operate(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.operator is not None
        if (self.restarting or self.handed_over) and msg.get("op") != "daemon_restart":
            return error_reply(
                StatusCode.UNAVAILABLE,
                "mrpcd is handing over to a new process (hot restart); retry in a moment",
            )
        return self.operator.handle(msg)

    # ------------------------------------------------------------------ hot restart

    def hot_restart(self, timeout: float | None = None) -> dict[str, Any]:
        """Start a new mrpcd from the installed code and hand everything over to it
        (``mrpcd/hotrestart.py``). On success this process must exit
        (``exit_handed_over``) once it has answered; raises RpcError after a rollback."""
        from mrpcd.hotrestart import hot_restart

        return hot_restart(self, self.config.restart_timeout if timeout is None else timeout)

    def exit_handed_over(self) -> None:
        """The new daemon serves: leave without closing or unlinking anything shared."""
        if self.pending_stop and self.successor_pid:
            log.info("passing the stop requested during the hot restart on to the new mrpcd")
            try:
                os.kill(self.successor_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        log.info("handed over to the new mrpcd; exiting")
        logging.shutdown()
        os._exit(0)

    def _app_request(self, conn: AppConn, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Answer one control message of an app (on the control loop or one of its workers).

        Returns the reply, or None when it was sent already (``register`` sends its
        fds); raises OSError when the connection broke (no reply to send)."""
        op = msg.get("op")
        try:
            if op == "register":
                if conn.app is not None:
                    raise RpcError(
                        StatusCode.ALREADY_EXISTS, "this connection is registered already"
                    )
                conn.app = self._register(
                    conn.sock,
                    msg,
                    conn.pid,
                    conn.uid,
                    Claimant(conn.uid, conn.gid, conn.groups, "", conn.pid),
                )
                return None
            if conn.app is None:
                raise RpcError(StatusCode.FAILED_PRECONDITION, f"register before {op!r}")
            return self._app_op(conn.app, op, msg)
        except RpcError as e:
            return error_reply(e.code(), e.details())
        except MrpcError as e:
            return error_reply(StatusCode.INVALID_ARGUMENT, str(e))
        except OSError as e:
            if e.errno not in OUT_OF_FDS:
                raise  # the app hung up or does not read: no reply to send
            log.warning(
                "control op %r of pid %d failed: mrpcd is out of file descriptors (%s)",
                op,
                conn.pid,
                e.strerror,
            )
            return error_reply(
                StatusCode.RESOURCE_EXHAUSTED,
                f"mrpcd is out of file descriptors ({e.strerror}) and cannot {op} now; "
                f"retry after other apps exit or ask the operator to raise its fd limit "
                f"(LimitNOFILE)",
            )
        except Exception as e:
            log.exception("control op %r of pid %d failed", op, conn.pid)
            return error_reply(StatusCode.INTERNAL, f"mrpcd failed on {op!r}: {e}")

    def _app_gone(self, conn: AppConn, reason: str) -> None:
        if conn.app is not None:
            self._cleanup(conn.app, reason)

    # ------------------------------------------------------------------ app lifecycle

    def _admit(self, uid: int) -> None:
        """Count a registration of ``uid`` against apps.max and apps.max_per_uid, or raise."""
        limits = self.config.apps
        with self.apps_lock:
            total = len(self.apps) + sum(self._registering.values())
            mine = sum(1 for a in self.apps.values() if a.uid == uid) + self._registering.get(
                uid, 0
            )
            if total >= limits.max:
                raise RpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"mrpcd has {total} applications registered, its limit (apps.max = "
                    f"{limits.max}); retry after others exit or ask the operator to raise it",
                )
            if mine >= limits.max_per_uid:
                raise RpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"uid {uid} has {mine} applications registered at this mrpcd, the limit "
                    f"per user (apps.max_per_uid = {limits.max_per_uid}); close some or ask "
                    f"the operator to raise it",
                )
            self._take_register_token(uid)
            self._registering[uid] = self._registering.get(uid, 0) + 1

    def _take_register_token(self, uid: int) -> None:
        """apps.register_rate per uid (a token bucket); raise when ``uid`` registers too
        fast. Call with apps_lock held."""
        limits, now = self.config.apps, time.monotonic()
        tokens, then = self._register_tokens.get(uid, (float(limits.register_burst), now))
        tokens = min(float(limits.register_burst), tokens + (now - then) * limits.register_rate)
        if tokens < 1.0:
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"uid {uid} registers applications faster than apps.register_rate "
                f"({limits.register_rate:g}/s after a burst of {limits.register_burst}); "
                f"retry in {(1.0 - tokens) / limits.register_rate:.2f}s",
            )
        self._register_tokens[uid] = (tokens - 1.0, now)
        if len(self._register_tokens) > 4096:  # forget users whose buckets are full again
            full = [
                u
                for u, (t, w) in self._register_tokens.items()
                if t + (now - w) * limits.register_rate >= limits.register_burst
            ]
            for u in full:
                del self._register_tokens[u]

    def _registered(self, uid: int) -> None:
        """A registration of ``uid`` is no longer under way (call with apps_lock held)."""
        left = self._registering[uid] - 1
        if left:
            self._registering[uid] = left
        else:
            del self._registering[uid]

    def _register(
        self, sock: socket.socket, msg: dict[str, Any], pid: int, uid: int, claimant: Claimant
    ) -> AppState:
        """Register the app on ``sock``: all or nothing. If anything fails (the app
        hung up before the reply arrived, included) everything is undone."""
        if self.draining or self._stopping.is_set():
            raise RpcError(
                StatusCode.UNAVAILABLE, "mrpcd is shutting down; retry against the new daemon"
            )
        self._admit(uid)
        added = False
        app: AppState | None = None
        try:
            name = str(msg.get("name") or f"pid{pid}")[:64]
            app_id = next(self._app_ids)
            regions, submit_efd, complete_efd = create_regions(name, self.layout)
            app = AppState(app_id, name, pid, uid, regions, submit_efd, complete_efd)
            app.registered_at = time.time()
            attach = self._make_datapath(app)
            runtime = app.runtime
            assert runtime is not None

            with self.apps_lock:
                self.apps[app_id] = app
                self._app_socks[app_id] = sock
                self._claimants[app_id] = Claimant(uid, claimant.gid, claimant.groups, name, pid)
                self._registered(uid)
                added = True
            runtime.call(attach)
            if self.operator is not None:
                self.operator.app_registered(app)  # standing policies before the first call
            send_msg(
                sock,
                {
                    "ok": True,
                    "app_id": app_id,
                    "name": name,
                    "layout": self.layout.to_dict(),
                    "daemon": self.name,
                    "version": VERSION,
                },
                regions.fds(),
            )
        except BaseException as e:
            if added:
                assert app is not None
                self._cleanup(app, f"registration failed: {e}")
            else:
                with self.apps_lock:
                    self._registered(uid)
                if app is not None:
                    app.close()
            raise
        finally:
            if app is not None:
                app.regions.close_fds()
        log.info(
            "app %r (pid %d, uid %d) registered as #%d on %s", name, pid, uid, app_id, runtime.name
        )
        return app

    def _make_datapath(self, app: AppState) -> Callable[[], None]:
        """Give ``app`` its runtime and datapath; returns what puts them to work
        (run it on that runtime)."""
        runtime = self.runtimes[app.app_id % len(self.runtimes)]
        app.runtime = runtime  # the one runtime that owns this app's datapath
        app.waker = runtime.wake_soon
        app.on_broken = self._app_broken
        name, submit_efd = app.name, app.submit_efd

        def context(engine_id: str) -> EngineContext:
            return EngineContext(
                engine_id,
                name,
                app.pid,
                self.clock,
                runtime_local=runtime.local,
                services=self.services,
                port=app,
                poller=runtime.poller,
                wake=runtime.wake_soon,
            )

        fe = self.frontend_cls(context(f"{name}/frontend"), {})
        tr = self.transport_cls(context(f"{name}/{self.transport_cls.NAME}"), {})
        app.datapath = Datapath(name, fe, tr, inbox=app.inbox)

        def attach() -> None:
            runtime.add_engine(fe)
            runtime.add_engine(tr)
            # the app's "I posted" signal: read it (the frontend polls the ring itself)
            runtime.poller.register(submit_efd, 1, lambda _events: drain(submit_efd))

        return attach

    def _app_op(self, app: AppState, op: Any, msg: dict[str, Any]) -> dict[str, Any]:
        if op == "bind_schema":
            texts = check_texts(msg.get("texts"), self.config.schema.max_bytes)
            key = cache_key_for(texts)
            with app.lock:
                known = any(getattr(b.module, "CACHE_KEY", None) == key for b in app.bindings)
                count = len(app.bindings)
            limit = self.config.schema.max_per_app
            if not known and count >= limit:
                raise RpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"app {app.name!r} has bound {count} schemas, the most schema.max_per_app "
                    f"({limit}) allows; bind fewer distinct schemas or ask the operator to raise it",
                )
            result = self.bindings.bind(texts)
            module = result.module
            with app.lock:
                for b in app.bindings:
                    if b.schema_hash == result.schema_hash:
                        slot = b.slot
                        break
                else:
                    slot = len(app.bindings)
                    app.bindings.append(
                        Binding(slot, module, result.schema_hash, tuple(module.SERVICES))
                    )
                    app.schema_texts.append(texts)  # a hot restart binds them again
            return {
                "ok": True,
                "slot": slot,
                "schema_hash": result.schema_hash,
                "how": result.how,
                "bind_ms": round(result.seconds * 1e3, 3),
            }
        if op == "connect":
            asked = msg.get("slot")
            if not isinstance(asked, int) or not 0 <= asked < len(app.bindings):
                raise RpcError(
                    StatusCode.INVALID_ARGUMENT, f"connect names unknown schema slot {asked!r}"
                )
            slot = asked
            try:
                host, port = parse_hostport(msg.get("addr"), key="addr", source="connect request")
            except MrpcError as e:
                raise RpcError(StatusCode.INVALID_ARGUMENT, str(e)) from None
            with app.lock:
                for spec in app.conns.values():  # the same target: share its connection
                    if spec.key == (host, port, slot):
                        return {"ok": True, "conn_id": spec.conn_id}
                limit = self.config.tcp.max_connections_per_app
                if len(app.conns) >= limit:
                    raise RpcError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"app {app.name!r} is connected to {len(app.conns)} targets, the limit "
                        f"(tcp.max_connections_per_app) is {limit}; reuse a channel",
                    )
                conn_id = len(app.conns) + 1
                app.conns[conn_id] = ConnSpec(conn_id, host, port, slot)
            return {"ok": True, "conn_id": conn_id}
        if op == "serve":
            asked = msg.get("slot")
            services = msg.get("services")
            if not isinstance(asked, int) or not 0 <= asked < len(app.bindings):
                raise RpcError(
                    StatusCode.INVALID_ARGUMENT, f"serve names unknown schema slot {asked!r}"
                )
            slot = asked
            binding = app.bindings[slot]
            if not isinstance(services, list) or not services:
                raise RpcError(StatusCode.INVALID_ARGUMENT, "serve needs a list of service names")
            unknown = [s for s in services if s not in binding.services]
            if unknown:
                raise RpcError(
                    StatusCode.NOT_FOUND,
                    f"schema {binding.schema_hash} has no service "
                    f"{', '.join(map(str, unknown))}; it defines {', '.join(binding.services)}",
                )
            claimant = self._claimants.get(app.app_id) or Claimant(
                app.uid, -1, frozenset(), app.name, app.pid
            )
            taken = self.router.bind(
                app,
                binding,
                services,
                lambda svc, owner, holder: self.service_policy.authorize(
                    svc, claimant, owner, holder
                ),
            )
            for svc, other in taken:
                log.warning(
                    "app %r (pid %d, uid %d) took service %s over from app %r (pid %d, uid %d)",
                    app.name,
                    app.pid,
                    app.uid,
                    svc,
                    other.name,
                    other.pid,
                    other.uid,
                )
            log.info("app %r serves %s", app.name, ", ".join(services))
            return {"ok": True}
        if op == "unserve":
            self.router.unbind_app(app)
            app.served.clear()
            return {"ok": True}
        if op == "ping":
            return {"ok": True}
        if op == "peer":  # context.peer(): who made server call ``token`` (as its daemon says)
            call = app.server_calls.get(msg.get("token"))  # type: ignore[arg-type]
            return {"ok": True, "peer": (call.peer if call is not None else "") or "unknown"}
        raise RpcError(StatusCode.UNIMPLEMENTED, f"unknown control operation {op!r}")

    def _app_broken(self, app: AppState, reason: str) -> None:
        """Disconnect a misbehaving app; the control loop then reads end of stream and cleans it up."""
        with self.apps_lock:
            sock = self._app_socks.get(app.app_id)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _cleanup(self, app: AppState, reason: str) -> None:
        with self.apps_lock:
            self._app_socks.pop(app.app_id, None)
            self._claimants.pop(app.app_id, None)
            if self.apps.pop(app.app_id, None) is None:
                return
        self.router.unbind_app(app)
        runtime = app.runtime
        assert runtime is not None
        try:
            runtime.call(lambda: self._teardown(app, reason))
        except Exception:
            log.exception("teardown of app %r failed", app.name)
        log.info("app %r (pid %d) cleaned up: %s", app.name, app.pid, reason)
        if self.operator is not None:
            self.operator.app_left(app)

    def _teardown(self, app: AppState, reason: str) -> None:
        dp = app.datapath
        assert dp is not None and app.runtime is not None
        app.closed = True
        for engine in dp.engines:
            app.runtime.remove_engine(engine)
        app.runtime.poller.unregister(app.submit_efd)
        items: list[Rpc] = dp.drain_all() + list(app.server_calls.values())
        app.server_calls.clear()
        gone = f"server app {app.name!r} (pid {app.pid}) exited before replying ({reason}); retry"
        try:
            dp.transport.abandon(items, gone)  # its callers hear UNAVAILABLE, from the transport
        except Exception:
            log.exception("transport of %r failed to abandon its calls", app.name)
        for engine in dp.engines:
            try:
                engine.close()
            except Exception:
                log.exception("closing engine %s of %r failed", engine.NAME, app.name)
            if engine.state.value != "detached":
                engine.lifecycle("detach")
        dp.state = "closed"
        app.close()

    def describe_apps(self) -> list[dict[str, Any]]:
        with self.apps_lock:
            apps = list(self.apps.values())
        out = []
        for app in apps:
            try:
                d = app.runtime.call(app.describe) if app.runtime else app.describe()
            except Exception as e:  # noqa: BLE001 - one app's failure is shown in its row, not raised
                d = {"app_id": app.app_id, "name": app.name, "uid": app.uid, "error": str(e)}
            with self.router.lock:  # a service taken over by another app is no longer served here
                d["serves"] = sorted(s for s in app.served if self.router.services.get(s) is app)
            out.append(d)
        return out

    def describe_services(self) -> list[dict[str, Any]]:
        """Every service name this daemon knows: its owner uid and the app serving it now."""
        with self.router.lock:
            owners = dict(self.router.owners)
            serving = dict(self.router.services)
        out = []
        for svc in sorted(owners):
            o, app = owners[svc], serving.get(svc)
            rule = self.service_policy.rule_for(svc)
            out.append(
                {
                    "service": svc,
                    "owner_uid": o.uid,
                    "owner_app": o.app_name,
                    "owner_pid": o.pid,
                    "since": round(o.since, 3),
                    "served_by": None
                    if app is None or app.closed
                    else {"app": app.name, "app_id": app.app_id, "pid": app.pid, "uid": app.uid},
                    "rule": None if rule is None else f"services[{rule.index}] ({rule.name})",
                }
            )
        return out

    def find_apps(self, selector: str) -> list[AppState]:
        with self.apps_lock:
            apps = list(self.apps.values())
        if selector in ("*", "--all"):
            return apps
        return [
            a
            for a in apps
            if a.name == selector or str(a.pid) == selector or f"#{a.app_id}" == selector
        ]


def _nothing() -> None:
    pass


def _posted(app: AppState) -> int:
    try:
        return app.submit.available()
    except Exception:  # noqa: BLE001 - RingCorrupted or the app closed under us
        return 0
