"""The one place that turns errors into HTTP: a status code, headers, and OpenAI's JSON error body.

Domain errors (`service.errors`) carry no status; `answer()` gives each its own. The OpenAI routes (/v1)
speak OpenAI's dialect: every invalid request is a 400 and an unknown model a 404 in OpenAI's words, as
its client libraries expect; the native routes say 422 and 400. `HttpError` is for what only the edge
can get wrong (the access token, the body's media type and JSON syntax). Every error, on every path,
has the same body, `{"error": {"message", "type", "param", "code"}}`, so one client-side handler reads
them all. `install(app)` registers the handlers.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from ..errors import (
    ConversationNotFound,
    GenerationFailed,
    HistoryDisabled,
    HistoryUnavailable,
    ImageNotFound,
    InvalidRequest,
    ModelUnavailable,
    PromptTooLong,
    QueueFull,
    ServiceError,
    UnknownModel,
)

log = logging.getLogger(__name__)

OPENAI_BLUEPRINT = "openai"


class HttpError(Exception):
    """An error of the HTTP edge itself, with its status: not something the domain could raise."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.answer = Answer(status, message, kind, param, code, headers or {})


@dataclass(frozen=True)
class Answer:
    """What a client receives for an error: status, OpenAI-shaped body fields, headers."""

    status: int
    message: str
    kind: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def answer(exc: ServiceError, *, openai: bool = False) -> Answer:
    """The status, body and headers for a domain error, in the native or the OpenAI dialect."""
    if isinstance(exc, InvalidRequest):
        return Answer(400 if openai else 422, exc.message, param=exc.param)
    if isinstance(exc, UnknownModel):
        if openai:
            offered = ", ".join(exc.offered)
            message = f"The model `{exc.model}` does not exist. Offered: {offered}"
            return Answer(404, message, param="model", code="model_not_found")
        return Answer(400, exc.message, param="model", code="model_not_found")
    if isinstance(exc, PromptTooLong):
        return Answer(413, exc.message, "context_length_exceeded")
    if isinstance(exc, ModelUnavailable):
        return Answer(503, exc.message, "model_unavailable", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, QueueFull):
        message = f"{exc.message}; retry in {exc.retry_after} s"
        return Answer(503, message, "server_busy", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, GenerationFailed):
        return Answer(500, exc.message, "server_error")
    if isinstance(exc, HistoryDisabled):
        return Answer(404, exc.message, "not_found", code="history_disabled")
    if isinstance(exc, HistoryUnavailable):
        return Answer(503, exc.message, "server_busy", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, (ConversationNotFound, ImageNotFound)):
        return Answer(404, exc.message, "not_found")
    return Answer(500, exc.message, "server_error")


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> Response:
    """OpenAI's error object: the one shape of every error body."""
    return jsonify(error={"message": message, "type": kind, "param": param, "code": code})


def _respond(a: Answer) -> tuple[Response, int, dict[str, str]]:
    return error_body(a.message, a.kind, a.param, a.code), a.status, a.headers


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_body(image_bytes: int = 0) -> Any:
    """The request's JSON, or the 415/413/400/422 error a client should see instead.

    The body is read here, at most MAX_BODY_BYTES + 1 bytes of it, so a chunked body (no
    Content-Length) that is too large is a 413 like any other, not a cut-off "invalid JSON". JSON
    too deeply nested for the parser is invalid JSON, and a string holding half of a surrogate pair
    (valid JSON, but no UTF-8 can carry it: the tokenizer and SQLite would fail on it) is refused
    before anything tries to use it.

    `image_bytes` lets a chat body carry that many bytes of images (base64) beyond MAX_BODY_BYTES:
    only a body that mentions images is read past MAX_BODY_BYTES at all, and once parsed, what is
    not image data is held to MAX_BODY_BYTES as before."""
    limit = current_app.extensions["settings"].max_body_bytes
    if image_bytes:
        request.max_content_length = limit + image_bytes + 1
    if request.mimetype != "application/json":
        raise HttpError(
            415, "send the body as JSON with 'Content-Type: application/json'", "unsupported_media_type"
        )
    raw = _bounded_body(limit + image_bytes)
    if len(raw) > limit and (not image_bytes or not _mentions_images(raw)):
        raise RequestEntityTooLarge()
    try:
        data = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise HttpError(400, "the body is not valid JSON: it is nested too deeply") from None
    except NotJson as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    except ValueError:
        raise HttpError(400, "the body is not valid JSON") from None
    if len(raw) > limit and len(raw) - _image_data_bytes(data) > limit:
        raise RequestEntityTooLarge()
    where = _lone_surrogate(data)
    if where is not None:
        raise InvalidRequest(
            f"{where or 'body'}: holds a lone UTF-16 surrogate (half of a \\ud83d\\ude00 pair), "
            "which is not text",
            param=where or None,
        )
    return data


class NotJson(ValueError):
    """What Python's parser accepts but JSON (RFC 8259) does not, which no browser could read back."""


def _not_json(name: str) -> Any:
    raise NotJson(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: valid JSON, but out of a double's range
        raise NotJson(f"{text} is out of range")
    return value


def _mentions_images(raw: bytes) -> bool:
    return b'"images"' in raw or b'"image_url"' in raw


def _image_data_bytes(data: Any) -> int:
    """Characters of image data in a chat body: /api's "images" lists and /v1's image_url URLs."""
    total = 0
    turns = data.get("messages") if isinstance(data, dict) else None
    for turn in [data, *(turns if isinstance(turns, list) else [])]:
        if not isinstance(turn, dict):
            continue
        images = turn.get("images")
        total += sum(len(i) for i in images if isinstance(i, str)) if isinstance(images, list) else 0
        content = turn.get("content")
        for part in content if isinstance(content, list) else []:
            url = part.get("image_url") if isinstance(part, dict) else None
            total += len(url["url"]) if isinstance(url, dict) and isinstance(url.get("url"), str) else 0
    return total


def _bounded_body(limit: int) -> bytes:
    # MAX_CONTENT_LENGTH is limit + 1 (app.py): werkzeug refuses a larger Content-Length itself and
    # otherwise stops reading one byte past the limit, which is how a chunked body shows it is too big.
    data = request.get_data(cache=True)
    if len(data) > limit:
        raise RequestEntityTooLarge()
    return data


def _lone_surrogate(data: Any) -> str | None:
    """The dotted path of the first string (or key) holding a lone surrogate, "" for the body
    itself, None when there is none. Iterative: the parser's nesting depth is no bound here."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if _LONE_SURROGATE.search(key):
                    return child
                stack.append((item, child))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value))
    return None


def retry_after_seconds() -> int:
    """Seconds until the rate limit that refused this request lets the client in again."""
    limiter = current_app.extensions.get("rate_limiter")
    current = limiter.current_limit if limiter is not None else None
    if current is None:
        return 60
    return max(1, int(current.reset_at - time.time()) + 1)


def install(app: Flask, *, max_body_bytes: int) -> None:
    """Answer every error of `app` in the one JSON shape, with the status this module gives it."""

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError) -> tuple[Response, int, dict[str, str]]:
        return _respond(answer(exc, openai=request.blueprint == OPENAI_BLUEPRINT))

    @app.errorhandler(HttpError)
    def http_edge_error(exc: HttpError) -> tuple[Response, int, dict[str, str]]:
        return _respond(exc.answer)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int, dict[str, str]]:
        status = exc.code or 500
        message = exc.description or exc.name
        headers: dict[str, str] = {}
        if status == 413:
            message = f"the request body is larger than {max_body_bytes} bytes"
            extra = (request.max_content_length or max_body_bytes + 1) - max_body_bytes - 1
            if extra > 0:
                message += f" besides its images (up to {extra} bytes more of them)"
        elif isinstance(exc, MethodNotAllowed) and exc.valid_methods:  # RFC 9110: a 405 names what is allowed
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
            message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
        elif status == 429:
            wait = retry_after_seconds()
            message = f"rate limit exceeded ({exc.description} per client); retry in {wait} s"
            headers["Retry-After"] = str(wait)
        return error_body(message, exc.name.lower().replace(" ", "_")), status, headers

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_body("internal server error", "server_error"), 500
