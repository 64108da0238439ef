"""The gunicorn worker the service runs: gunicorn's threaded worker, with its own error answers in JSON.

gunicorn answers what never reaches the app itself: a request line longer than
`--limit-request-line` (414), too many or too large headers (431), a malformed request (400). It
writes those as an HTML page, which an API client cannot read like every other error. This worker
writes them in the service's one error shape instead (`{"error": {"message", "type", ...}}`).
gunicorn builds every such answer through `gunicorn.util.write_error(sock, status, reason, message)`,
called from `Worker.handle_error`; replacing that one function, in the worker process only, keeps all
of gunicorn's own choice of status and wording (the alternative, copying `handle_error`, would fork
a hundred lines of it).
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from ..inference import startup


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error`, answering in the service's JSON error shape."""
    kind = "server_error" if status_int >= 500 else "invalid_request_error"
    body = json.dumps(
        {
            "error": {
                "message": mesg or reason,
                "type": kind,
                "param": None,
                "code": reason.lower().replace(" ", "_"),
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        "Cache-Control: no-store\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    util.write_nonblock(sock, head + body)


class JsonErrorWorker(ThreadWorker):
    """`gthread`, whose own 4xx/5xx answers are JSON."""

    def init_process(self) -> None:
        util.write_error = write_json_error
        # From here (the worker, before it imports the app) until the model has loaded: see
        # service/inference/startup.py; the app's loader resumes it.
        startup.pause_gc()
        super().init_process()
