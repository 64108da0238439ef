"""Server-sent events, shared by both stream formats (/api/chat and /v1/chat/completions): framing,
the keep-alive heartbeat, and the streaming response's headers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Response

# Seconds of silence after which a stream sends a comment line, so proxies and clients keep it open
# (and a client that left is noticed while its request still waits in the queue).
HEARTBEAT_SECONDS = 10.0
KEEP_ALIVE = ": keep-alive\n\n"


def data(payload: Any) -> str:
    """One `data:` event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def response(events: Iterator[str]) -> Response:
    """A streaming response that no proxy buffers or caches."""
    return Response(
        events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
