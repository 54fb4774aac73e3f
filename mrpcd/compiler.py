"""Compiling a schema in a child process, off the daemon's threads and memory.

How this works: :func:`compile_in_child` starts ``python -m mrpcd.compiler`` in a
new session, writes the request (schema texts and limits) to its stdin and
waits at most ``schema.compile_timeout``. The child sets its own address-space
and CPU-time limits, then runs protoc (itself a child, which inherits the
limits), checks the schema, generates the module and compiles it in chunks. It
answers on stdout with the module's code objects (marshalled, compressed) or
with the schema error. protoc's messages come back in that answer, so nothing
touches the daemon's stderr. A child that runs over a limit is killed with its
whole process group and the bind fails with RESOURCE_EXHAUSTED naming the limit
and its config key.
"""

from __future__ import annotations

import json
import logging
import marshal
import os
import resource
import signal
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

from libmrpc.status import RpcError, SchemaError, StatusCode

log = logging.getLogger(__name__)

EXIT_MEMORY = 3
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class Compiled:
    """A compiled schema: its identity and ``zlib(marshal(tuple of code objects))``."""

    cache_key: str
    schema_hash: str
    payload: bytes


def compile_in_child(texts: dict[str, str], *, timeout: float, memory: int) -> Compiled:
    """Compile ``texts`` in a child process within ``timeout`` seconds and ``memory`` bytes.

    Raises SchemaError (protoc's or the checker's message) for a bad schema,
    RpcError(RESOURCE_EXHAUSTED) when a limit is hit, RpcError(INTERNAL) if the
    child failed otherwise (its last stderr line is logged).
    """
    request = json.dumps({"texts": texts, "memory": memory, "cpu": timeout}).encode()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p
        ),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mrpcd.compiler"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd="/",
        env=env,
    )
    try:
        out, err = proc.communicate(request, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise RpcError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"compiling the schema took longer than schema.compile_timeout ({timeout:g}s); "
            f"make the schema smaller or ask the operator to raise the limit",
        ) from None
    except BaseException:
        _kill(proc)
        raise
    finally:
        _kill_group(proc.pid)
    rc = proc.returncode
    if rc == 0 and out.startswith(b"OK\n"):
        head, _, payload = out[3:].partition(b"\n")
        meta = json.loads(head)
        return Compiled(meta["cache_key"], meta["schema_hash"], payload)
    if rc == 0 and out.startswith(b"ERR\n"):
        raise SchemaError(out[4:].decode("utf-8", "replace"))
    if rc == EXIT_MEMORY or (rc < 0 and -rc in (signal.SIGSEGV, signal.SIGABRT)):
        raise RpcError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"compiling the schema needs more memory than schema.compile_memory "
            f"({memory >> 20} MiB); make the schema smaller or ask the operator to raise the limit",
        )
    if rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL):
        raise RpcError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"compiling the schema used more CPU time than schema.compile_timeout ({timeout:g}s)",
        )
    last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["(no output)"]
    log.error("schema compiler process failed with exit code %s: %s", rc, last[0])
    raise RpcError(
        StatusCode.INTERNAL,
        f"the schema compiler process failed (exit code {rc}); see the mrpcd log",
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    _kill_group(proc.pid)
    try:
        proc.kill()
    except OSError:
        pass
    proc.communicate()


def _kill_group(pgid: int) -> None:
    """protoc may still run in the child's session after the child is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def load_payload(payload: bytes, max_size: int) -> tuple[CodeType, ...]:
    """The code objects of a :class:`Compiled` payload; ValueError if it is not one."""
    d = zlib.decompressobj()
    raw = d.decompress(payload, max_size)
    if d.unconsumed_tail or not d.eof:
        raise ValueError("compiled schema is truncated or larger than allowed")
    codes = marshal.loads(raw)
    if not isinstance(codes, tuple) or not all(isinstance(c, CodeType) for c in codes):
        raise ValueError("compiled schema does not hold code objects")
    return codes


# --- the child ---------------------------------------------------------------------------


def _child() -> int:
    os.umask(0o077)  # the temporary files of protoc are for us alone, whatever the daemon's umask
    req = json.loads(sys.stdin.buffer.read())
    memory, cpu = int(req["memory"]), max(1, int(req["cpu"]) + 1)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        from libmrpc._codegen import compile_source, generate_source
        from libmrpc._schema import compile_texts

        bundle = compile_texts(req["texts"])
        filename = f"<mrpc schema {bundle.cache_key[:16]}>"
        codes = compile_source(generate_source(bundle), filename)
        payload = zlib.compress(marshal.dumps(codes), 1)
    except SchemaError as e:
        sys.stdout.buffer.write(b"ERR\n" + str(e).encode("utf-8", "replace"))
        return 0
    except MemoryError:
        return EXIT_MEMORY
    head = json.dumps({"cache_key": bundle.cache_key, "schema_hash": bundle.schema_hash}).encode()
    sys.stdout.buffer.write(b"OK\n" + head + b"\n" + payload)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
