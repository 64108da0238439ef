"""Chat requests: validated once at the edge, then turned into a prompt that fits the context.

`parse_chat_request` turns raw JSON into a `ChatRequest` or raises `InvalidRequest` with the message a
client should see; nothing below this module sees raw JSON. `build_prompt` applies the model's own
chat template and, when a conversation is longer than the context budget, leaves out its oldest turns
(the system prompt and the newest user turn always stay). `start` is the one path from a request to a
running generation behind both APIs: pick the model, build the prompt with its tokenizer, queue it.
What refuses a request is a `service.errors` error; the web layer decides what HTTP says about it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidRequest, PromptTooLong
from .inference.engine import Generation, SamplingOptions
from .models import ModelManager

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _printable(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain NUL or control characters (tab and newlines are fine)")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Content = Annotated[str, AfterValidator(_printable)]


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Content


class ChatBody(BaseModel):
    """The JSON body of POST /api/chat (`message` is shorthand for one user turn)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    messages: Annotated[list[Message], Field(min_length=1, max_length=1000)] | None = None
    message: Content | None = None
    stream: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]
        | None
    ) = None
    conversation_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=500)] | None = None

    @model_validator(mode="after")
    def _one_conversation(self) -> ChatBody:
        if (self.messages is None) == (self.message is None):
            raise ValueError("give either 'messages' (a list of turns) or 'message' (one user turn)")
        if self.message is not None:
            self.messages = [Message(role="user", content=self.message)]
        if not self.messages or self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    options: SamplingOptions
    stream: bool
    conversation_id: str | None = None
    model: str | None = None


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_chat_request(data: Any, *, default_max_tokens: int, max_tokens_limit: int) -> ChatRequest:
    """Validate a decoded JSON body; raise `InvalidRequest` saying exactly what is wrong."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        body = ChatBody.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None
    chat = make_request(
        body.messages or [],
        stream=body.stream,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop,
        default_max_tokens=default_max_tokens,
        max_tokens_limit=max_tokens_limit,
    )
    return replace(chat, conversation_id=body.conversation_id, model=body.model)


def make_request(
    messages: list[Message],
    *,
    stream: bool,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | list[str] | None,
    default_max_tokens: int,
    max_tokens_limit: int,
    max_tokens_name: str = "max_tokens",
) -> ChatRequest:
    """The checks both API formats share, ending in the one `ChatRequest` the engine path takes."""
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > max_tokens_limit:
        raise InvalidRequest(f"{max_tokens_name}: must be at most {max_tokens_limit}", param=max_tokens_name)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    options = SamplingOptions(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stops
    )
    return ChatRequest(messages=[m.model_dump() for m in messages], options=options, stream=stream)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    dropped_messages: int


def build_prompt(
    tokenizer: Any, messages: list[dict[str, str]], *, context_length: int, max_tokens: int
) -> Prompt:
    """Apply the chat template, dropping the oldest turns until prompt + reply fit the context.

    The system prompt (if first) and the newest user turn are always kept; turns are dropped so the
    remaining conversation still starts with a user turn, which strict templates require. Raises
    `PromptTooLong` when even those cannot fit.
    """
    budget = context_length - max_tokens
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    while True:
        ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, return_dict=False)
        if len(ids) <= budget:
            return Prompt(list(ids), dropped)
        if len(turns) == 1:
            raise PromptTooLong(
                f"the prompt needs {len(ids)} tokens but only {max(budget, 0)} fit: the context holds "
                f"{context_length} tokens and {max_tokens} are kept for the reply (max_tokens); "
                "shorten the message or the system prompt, or lower max_tokens"
            )
        turns = turns[1:]
        dropped += 1
        while turns[0]["role"] != "user":
            turns = turns[1:]
            dropped += 1


@dataclass(frozen=True)
class Started:
    """A generation under way, with what the response needs to say about it."""

    generation: Generation
    model: str
    dropped_messages: int


def start(models: ModelManager, chat: ChatRequest) -> Started:
    """Pick the model, build the prompt and queue it: the one generation path behind every API.

    Raises `UnknownModel`, `ModelUnavailable`, `PromptTooLong` or `QueueFull` (service.errors)."""
    offer = models.active if chat.model is None else models.find(chat.model)
    engine = models.engine(offer.id)
    prompt = build_prompt(
        engine.tokenizer,
        chat.messages,
        context_length=engine.context_length,
        max_tokens=chat.options.max_tokens,
    )
    generation = engine.submit(prompt.ids, chat.options)
    return Started(generation, offer.id, prompt.dropped_messages)
