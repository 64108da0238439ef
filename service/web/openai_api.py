"""OpenAI-compatible routes: POST /v1/chat/completions and GET /v1/models.

Formats only. Requests are validated into the same `ChatRequest` as /api/chat and run through the
same `chat.start()`; only the JSON shapes differ. Parameters this service cannot honour are refused
with OpenAI's error object rather than silently ignored, so a client learns the truth.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Annotated, Any, Literal

from flask import Blueprint, Response, current_app, jsonify
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import Content, Message, RequestError, make_request, start
from ..inference.engine import Finished, Generation
from ..models import ModelManager, UnknownModel
from .sse import HEARTBEAT_SECONDS, KEEP_ALIVE, json_body

bp = Blueprint("openai", __name__, url_prefix="/v1")

UNSUPPORTED_HINT = "qwen-box does not support this parameter"


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Content | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def to_message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=text)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


StopText = Annotated[str, Field(min_length=1)]


class CompletionBody(BaseModel):
    """OpenAI's chat completion request, minus what cannot be honoured (refused below)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    n: Literal[1] | None = None
    user: str | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None
    response_format: dict[str, Literal["text"]] | None = None
    # Everything else OpenAI defines (tools, logit_bias, ...) is refused as an unknown argument.


def _models() -> ModelManager:
    return current_app.extensions["models"]


def _validation_error(exc: ValidationError) -> RequestError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first["type"] == "literal_error" and param in (
        "n",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "response_format.type",
    ):
        message = f"{UNSUPPORTED_HINT}: {param} must be {first['ctx']['expected']}"
    else:
        message = f"Invalid value for '{param}': {first['msg'].removeprefix('Value error, ')}"
    return RequestError(400, message, param=param)


@bp.get("/models")
def models() -> Response:
    return jsonify(
        object="list",
        data=[{"id": i, "object": "model", "created": 0, "owned_by": "qwen-box"} for i in _models().offered],
    )


@bp.post("/chat/completions")
def chat_completions() -> Response | tuple[Response, int]:
    data = json_body()
    if not isinstance(data, dict):
        raise RequestError(400, "The request body must be a JSON object")
    try:
        body = CompletionBody.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    try:
        model = _models().find(body.model).id
    except UnknownModel as exc:
        offered = ", ".join(exc.offered)
        raise RequestError(
            404,
            f"The model `{body.model}` does not exist. Offered: {offered}",
            param="model",
            code="model_not_found",
        ) from None
    messages = [m.to_message() for m in body.messages]
    if messages[-1].role != "user":
        raise RequestError(400, "The last message must have role 'user'", param="messages")
    settings = current_app.extensions["settings"]
    max_tokens_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    try:
        chat = make_request(
            messages,
            stream=body.stream,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
            max_tokens_name=max_tokens_name,
        )
    except RequestError as exc:  # OpenAI answers every invalid parameter with 400
        raise RequestError(400, exc.message, param=exc.param) from None
    started = start(_models(), replace(chat, model=model))
    completion = _Completion(started.model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Response(
            completion.stream(started.generation, include_usage),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        text, finished = started.generation.result()
    finally:
        started.generation.cancel()
    if finished.error:
        raise RequestError(500, f"generation failed: {finished.error}", kind="server_error")
    return jsonify(completion.whole(text, finished)), 200


def _finish_reason(finished: Finished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


def _usage(finished: Finished) -> dict[str, int]:
    return finished.usage.to_dict()


class _Completion:
    """One response's identity (id, created, model) and its two shapes."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _base(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def whole(self, text: str, finished: Finished) -> dict[str, Any]:
        return {
            **self._base("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": _finish_reason(finished),
                }
            ],
            "usage": _usage(finished),
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def stream(self, generation: Generation, include_usage: bool) -> Iterator[str]:
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            for event in generation.events(heartbeat=HEARTBEAT_SECONDS):
                if event is None:
                    yield KEEP_ALIVE
                elif isinstance(event, str):
                    yield self._chunk({"content": event})
                elif event.error:
                    error = {
                        "message": f"generation failed: {event.error}",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                    yield f"data: {json.dumps({'error': error})}\n\n"
                else:
                    yield self._chunk({}, _finish_reason(event))
                    if include_usage:
                        usage = {**self._base("chat.completion.chunk"), "choices": [], "usage": _usage(event)}
                        yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()
