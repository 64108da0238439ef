"""Small helpers for the HTTP edge that every blueprint shares."""

from __future__ import annotations

from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest

from ..chat import RequestError

# Seconds of silence after which a stream sends a comment line, so proxies and clients keep it open
# (and a client that left is noticed while its request still waits in the queue).
HEARTBEAT_SECONDS = 10.0
KEEP_ALIVE = ": keep-alive\n\n"


def json_body() -> Any:
    """The request's JSON, or the 415/400 error a client should see instead."""
    if request.mimetype != "application/json":
        raise RequestError(
            415, "send the body as JSON with 'Content-Type: application/json'", kind="unsupported_media_type"
        )
    try:
        return request.get_json()
    except BadRequest:
        raise RequestError(400, "the body is not valid JSON") from None
