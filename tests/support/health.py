"""The one stand-in /api/health: a real HTTP(S) server on a loopback port for the tasks that wait on a
service's health (run-local's container, deploy-azure's VM) to talk to."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HealthServer:
    """Answers every GET from a script of (status, JSON body) replies, in order, the last repeating;
    `hits` counts the requests. With `tls` (a server-side SSLContext holding a certificate) it speaks
    HTTPS. Stop it with `stop()`, or use it as a context manager."""

    def __init__(self, replies: list[tuple[int, dict]], tls: ssl.SSLContext | None = None):
        self.replies = list(replies)
        self.hits = 0
        health = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_GET(self) -> None:  # noqa: N802
                status, body = health.replies[min(health.hits, len(health.replies) - 1)]
                health.hits += 1
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
