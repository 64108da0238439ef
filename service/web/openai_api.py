"""OpenAI-compatible routes: POST /v1/chat/completions and GET /v1/models.

Formats only. Requests are validated into the same `ChatRequest` as /api/chat and run through the
same `chat.start()`; only the JSON shapes differ, and the errors, which `web/errors.py` words the way
OpenAI does for this blueprint. Parameters this service cannot honour are refused with OpenAI's error
object rather than silently ignored, so a client learns the truth.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Annotated, Any, Literal

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import Content, Message, Plain, StopText, make_request, start
from ..errors import GenerationFailed, InvalidRequest
from ..images import ImageLimits
from ..inference.engine import Finished, Generation
from ..models import ModelManager
from . import disconnect, sse
from .errors import OPENAI_BLUEPRINT, answer, json_body

bp = Blueprint(OPENAI_BLUEPRINT, __name__, url_prefix="/v1")

UNSUPPORTED_HINT = "qwen-box does not support this parameter"


class TextPart(BaseModel):
    """One part of a message's content: held to the same rules as a whole message (not empty, not
    blank, no NUL or control characters), so joining the parts cannot make an invalid message."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: Content


class ImageUrl(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    url: Annotated[str, Field(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """An image: a `data:` URL only. A remote URL is refused by `images.decode_base64`, never
    fetched: a server that fetched what clients name could be made to reach its own network."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Content | Annotated[list[TextPart | ImagePart], Field(min_length=1)]
    name: Plain | None = None

    def to_message(self) -> Message:
        if isinstance(self.content, str):
            text, images = self.content, []
        else:
            text = "".join(p.text for p in self.content if isinstance(p, TextPart))
            images = [p.image_url.url for p in self.content if isinstance(p, ImagePart)]
        role = "system" if self.role == "developer" else self.role
        try:
            return Message(role=role, content=text, images=images or None)
        except ValidationError as exc:
            reason = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            raise InvalidRequest(f"Invalid value for 'messages': {reason}", param="messages") from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


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
    user: Plain | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None
    response_format: dict[str, Literal["text"]] | None = None
    # Everything else OpenAI defines (tools, logit_bias, ...) is refused as an unknown argument.


def _models() -> ModelManager:
    return current_app.extensions["models"]


_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def _is_field(part: object) -> bool:
    return bool(_FIELD.fullmatch(str(part))) and str(part) not in ("str", "list", "TextPart", "ImagePart")


def _validation_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    # Content is text or a list of parts: for a list, "should be a valid string" is the wrong half.
    wrong_half = [e for e in errors if e["type"] == "string_type" and not all(map(_is_field, e["loc"]))]
    first = next((e for e in errors if e not in wrong_half), errors[0])
    # A union's error names the member it tried (`function-after[...]`, `list[TextPart]`): not a field.
    loc = [str(p) for p in first["loc"] if _is_field(p)]
    param = ".".join(loc) or None
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
    return InvalidRequest(message, param=param)


@bp.get("/models")
def models() -> Response:
    return jsonify(
        object="list",
        data=[{"id": i, "object": "model", "created": 0, "owned_by": "qwen-box"} for i in _models().offered],
    )


@bp.post("/chat/completions")
def chat_completions() -> Response | tuple[Response, int]:
    data = json_body(current_app.extensions["settings"].image_body_bytes)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    try:
        body = CompletionBody.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    model = _models().find(body.model).id  # UnknownModel: a 404 in OpenAI's words (web/errors.py)
    messages = [m.to_message() for m in body.messages]
    if messages[-1].role != "user":
        raise InvalidRequest("The last message must have role 'user'", param="messages")
    settings = current_app.extensions["settings"]
    max_tokens_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
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
        images=ImageLimits(settings.image_max_pixels, settings.max_images, settings.image_max_bytes),
        images_name="messages[{i}].content.image_url",
    )
    started = start(_models(), replace(chat, model=model))
    completion = _Completion(started.model)
    gone = disconnect.watcher(request.environ)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.response(completion.stream(started.generation, include_usage, gone))
    try:
        text, finished = started.generation.result(abandoned=gone)
    finally:
        started.generation.cancel()
    if finished.error:
        raise GenerationFailed(finished.error)
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
        return sse.data(chunk)

    def stream(self, generation: Generation, include_usage: bool, gone: Callable[[], bool]) -> Iterator[str]:
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            for event in generation.events(heartbeat=sse.HEARTBEAT_SECONDS, abandoned=gone):
                if event is None:
                    yield sse.KEEP_ALIVE
                elif isinstance(event, str):
                    yield self._chunk({"content": event})
                elif event.error:
                    failed = answer(GenerationFailed(event.error), openai=True)
                    error = {"message": failed.message, "type": failed.kind, "param": None, "code": None}
                    yield sse.data({"error": error})
                else:
                    yield self._chunk({}, _finish_reason(event))
                    if include_usage:
                        usage = {**self._base("chat.completion.chunk"), "choices": [], "usage": _usage(event)}
                        yield sse.data(usage)
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()
