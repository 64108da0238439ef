"""The one place that turns errors into HTTP: a status code, headers, and OpenAI's JSON error body.

Domain errors (`service.errors`) carry no status; `answer()` gives each its own. The OpenAI routes (/v1)
speak OpenAI's dialect: every invalid request is a 400 and an unknown model a 404 in OpenAI's words, as
its client libraries expect; the native routes say 422 and 400. `HttpError` is for what only the edge
can get wrong (the access token, the body's media type and JSON syntax). Every error, on every path,
has the same body, `{"error": {"message", "type", "param", "code"}}`, so one client-side handler reads
them all. `install(app)` registers the handlers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException

from ..errors import (
    ConversationNotFound,
    GenerationFailed,
    HistoryDisabled,
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
    if isinstance(exc, ConversationNotFound):
        return Answer(404, exc.message, "not_found")
    return Answer(500, exc.message, "server_error")


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> Response:
    """OpenAI's error object: the one shape of every error body."""
    return jsonify(error={"message": message, "type": kind, "param": param, "code": code})


def _respond(a: Answer) -> tuple[Response, int, dict[str, str]]:
    return error_body(a.message, a.kind, a.param, a.code), a.status, a.headers


def json_body() -> Any:
    """The request's JSON, or the 415/400 error a client should see instead."""
    if request.mimetype != "application/json":
        raise HttpError(
            415, "send the body as JSON with 'Content-Type: application/json'", "unsupported_media_type"
        )
    try:
        return request.get_json()
    except BadRequest:
        raise HttpError(400, "the body is not valid JSON") from None


def install(app: Flask, *, max_body_bytes: int) -> None:
    """Answer every error of `app` in the one JSON shape, with the status this module gives it."""

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError) -> tuple[Response, int, dict[str, str]]:
        return _respond(answer(exc, openai=request.blueprint == OPENAI_BLUEPRINT))

    @app.errorhandler(HttpError)
    def http_edge_error(exc: HttpError) -> tuple[Response, int, dict[str, str]]:
        return _respond(exc.answer)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = f"the request body is larger than {max_body_bytes} bytes"
        elif status == 429:
            message = f"rate limit exceeded ({exc.description} per client); retry later"
        return error_body(message, exc.name.lower().replace(" ", "_")), status

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_body("internal server error", "server_error"), 500
