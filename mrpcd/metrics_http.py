"""The daemon's Prometheus endpoint: ``GET /metrics`` for the registry engines fill.

The ``metrics`` policies of a daemon share one ``CollectorRegistry`` (handed to
them as ``ctx.services.metrics_registry``); this serves it over HTTP when
``metrics.listen`` is set.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def new_registry() -> Any:
    """A fresh registry, or None when prometheus_client is not installed."""
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        return None
    return CollectorRegistry()


def start_http_server(
    registry: Any, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None
) -> tuple[ThreadingHTTPServer, int]:
    """Serve ``GET /metrics`` from a daemon thread; return ``(server, bound_port)``.

    ``port=0`` picks a free port. Stop with ``server.shutdown(); server.server_close()``.
    Raises ``OSError`` when the address cannot be bound (nothing is left running).
    ``sock``: a listening socket to serve instead (a hot restart hands it over).
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics is served here")
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    if sock is None:
        server = ThreadingHTTPServer((host, port), Handler)
    else:
        server = ThreadingHTTPServer((host, port), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()[:2]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"mrpc-metrics-{port}", daemon=True)
    thread.start()
    return server, int(server.server_address[1])
