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
import weakref
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidRequest, PromptTooLong
from .images import ImageLimits, decode_base64, open_picture
from .inference.engine import Generation, SamplingOptions
from .models import ModelManager

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain NUL or control characters (tab and newlines are fine)")
    return value


def _printable(value: str) -> str:
    if not _no_control(value).strip():
        raise ValueError("must not be blank")
    return value


Content = Annotated[str, AfterValidator(_printable)]
# A stop sequence may be or hold a newline or tab, never NUL or another control character.
StopText = Annotated[str, Field(min_length=1), AfterValidator(_no_control)]
# A string that is a name or a tag, not text: no control characters at all.
Plain = Annotated[str, AfterValidator(_no_control)]
# A turn's text when it may carry images instead: blank is fine beside a picture.
MaybeContent = Annotated[str, AfterValidator(_no_control)]


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: MaybeContent
    # base64 image data (or data: URLs), on a user turn; decoded and checked by make_request
    images: Annotated[list[str], Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _images_from_user(self) -> Message:
        if self.images and self.role != "user":
            raise ValueError("only a user turn may carry images")
        if not self.images and not self.content.strip():
            raise ValueError("content: must not be blank")
        return self


class ChatBody(BaseModel):
    """The JSON body of POST /api/chat (`message` is shorthand for one user turn)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    messages: Annotated[list[Message], Field(min_length=1, max_length=1000)] | None = None
    message: MaybeContent | None = None  # blank only beside images
    images: Annotated[list[str], Field(max_length=64)] | None = None  # with `message`: its images
    stream: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    conversation_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=500)] | None = None

    @model_validator(mode="after")
    def _one_conversation(self) -> ChatBody:
        if (self.messages is None) == (self.message is None):
            raise ValueError("give either 'messages' (a list of turns) or 'message' (one user turn)")
        if self.images is not None and self.message is None:
            raise ValueError("'images' goes with 'message'; with 'messages', put them on a user turn")
        if self.message is not None:
            if not self.images and not self.message.strip():
                raise ValueError("message: must not be blank")
            self.messages = [Message(role="user", content=self.message, images=self.images)]
        if not self.messages or self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # role, content, and on a user turn maybe "images": [Picture]
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


def parse_chat_request(
    data: Any, *, default_max_tokens: int, max_tokens_limit: int, images: ImageLimits | None = None
) -> ChatRequest:
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
        images=images,
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
    images: ImageLimits | None = None,
    images_name: str = "messages.{i}.images.{j}",
) -> ChatRequest:
    """The checks both API formats share, ending in the one `ChatRequest` the engine path takes.
    Images are checked here from their headers (`images.open_picture`); their pixels are decoded
    only for a model that sees images (`start`), before anything runs or is stored."""
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > max_tokens_limit:
        raise InvalidRequest(f"{max_tokens_name}: must be at most {max_tokens_limit}", param=max_tokens_name)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    options = SamplingOptions(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stops
    )
    return ChatRequest(
        messages=_with_pictures(messages, images or ImageLimits(), images_name),
        options=options,
        stream=stream,
    )


def _with_pictures(messages: list[Message], limits: ImageLimits, name: str) -> list[dict[str, Any]]:
    count = sum(len(m.images or ()) for m in messages)
    if count > limits.max_images:
        raise InvalidRequest(
            f"the request carries {count} images; at most {limits.max_images} are accepted (MAX_IMAGES)",
            param="images",
        )
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.images:
            pictures = []
            for j, text in enumerate(m.images):
                where = name.format(i=i, j=j)
                data = decode_base64(text, where=where, max_bytes=limits.max_bytes)
                pictures.append(
                    open_picture(data, where=where, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
                )
            turn["images"] = pictures
        out.append(turn)
    return out


# A token of a byte-level BPE vocabulary holds ~4 characters of prose and rarely more than 16 of
# anything; a prompt is also refused past this many characters per context token, so a megabyte is
# never tokenized to learn that it cannot fit.
CHARS_PER_TOKEN = 16
# Re-renders of the chat template allowed to correct the per-message estimate (usually one is needed).
_MAX_RENDERS = 8


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    dropped_messages: int


class _Costs:
    """What the chat template adds around messages, in tokens, measured once per tokenizer.

    A conversation's prompt costs about `first + sum(tokens of each content) + per_message * (n - 1)`
    (+ `system` with a system prompt). With ChatML-like templates, whose special tokens separate the
    messages, that is exact for alternating turns; `build_prompt` checks it with one real render."""

    def __init__(self, tokenizer: Any):
        def render(messages: list[dict[str, str]]) -> int:
            return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))

        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        x, y, z, w = "hello", "fine thanks", "and you", "be brief"
        one = render([{"role": "user", "content": x}])
        three = render(
            [
                {"role": "user", "content": x},
                {"role": "assistant", "content": y},
                {"role": "user", "content": z},
            ]
        )
        with_system = render([{"role": "system", "content": w}, {"role": "user", "content": x}])
        self.first = one - count(x)
        self.per_message = (three - one - count(y) - count(z)) / 2
        self.system = with_system - one - count(w)


_COSTS: weakref.WeakKeyDictionary[Any, _Costs] = weakref.WeakKeyDictionary()


def _costs(tokenizer: Any) -> _Costs:
    try:
        return _COSTS[tokenizer]
    except KeyError:
        costs = _COSTS[tokenizer] = _Costs(tokenizer)
        return costs
    except TypeError:  # a tokenizer that cannot be weakly referenced: measure it each time
        return _Costs(tokenizer)


def _too_long(needs: str, budget: int, context_length: int, max_tokens: int) -> PromptTooLong:
    return PromptTooLong(
        f"{needs}, but only {max(budget, 0)} tokens fit: the context holds {context_length} tokens and "
        f"{max_tokens} are kept for the reply (max_tokens); shorten the message or the system prompt, "
        "or lower max_tokens"
    )


def build_prompt(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    context_length: int,
    max_tokens: int,
    chars_per_token: int = CHARS_PER_TOKEN,
) -> Prompt:
    """Apply the chat template, dropping the oldest turns until prompt + reply fit the context.

    The system prompt (if first) and the newest user turn are always kept; turns are dropped so the
    remaining conversation still starts with a user turn, which strict templates require. Raises
    `PromptTooLong` when even those cannot fit.

    Linear in the conversation, and bounded whatever its length: only the newest turns within
    `chars_per_token` characters per token of room are read at all, each is tokenized once, and the
    oldest are dropped from a running total, newest kept first. The template is then rendered for the
    kept turns alone (the prompt is exactly `apply_chat_template` of them), a few times at most when
    the estimate was off by a turn.
    """
    budget = context_length - max_tokens
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    char_budget = max(budget, 0) * chars_per_token
    chars = sum(len(m["content"]) for m in system) + len(turns[-1]["content"])
    if chars > char_budget:
        raise _too_long(
            f"the newest message and the system prompt hold {chars} characters, more than the "
            f"{char_budget} that can fit ({chars_per_token} characters per token at most)",
            budget,
            context_length,
            max_tokens,
        )
    oldest = len(turns) - 1  # the oldest turn within the character budget
    while oldest > 0 and chars + len(turns[oldest - 1]["content"]) <= char_budget:
        oldest -= 1
        chars += len(turns[oldest]["content"])
    window = turns[oldest:]
    counts = tokenizer([m["content"] for m in window], add_special_tokens=False)["input_ids"]
    costs = _costs(tokenizer)
    fixed = costs.first
    if system:
        fixed += costs.system + len(tokenizer.encode(system[0]["content"], add_special_tokens=False))
    # estimate[i]: the prompt's tokens when turns[oldest + i:] are kept
    estimate = [0.0] * len(window)
    total = fixed - costs.per_message
    for i in range(len(window) - 1, -1, -1):
        total += len(counts[i]) + costs.per_message
        estimate[i] = total
    starts = [i for i, m in enumerate(window) if i == 0 and oldest == 0 or m["role"] == "user"]

    def render(i: int) -> list[int]:
        return list(
            tokenizer.apply_chat_template(system + window[i:], add_generation_prompt=True, return_dict=False)
        )

    fitting = [i for i in starts if estimate[i] <= budget]
    k = starts.index(fitting[0]) if fitting else len(starts) - 1
    best: tuple[int, list[int]] | None = None
    renders = 0
    while renders < _MAX_RENDERS:
        ids = render(starts[k])
        renders += 1
        if len(ids) <= budget:
            best = (starts[k], ids)
            # the estimate may have been high: see whether one more exchange fits after all
            if k == 0 or estimate[starts[k - 1]] > budget + max(8, budget // 50):
                break
            k -= 1
            continue
        if best is not None or k == len(starts) - 1:
            break
        # too long: skip ahead past as many turns as the excess calls for (at least one)
        target = estimate[starts[k]] - (len(ids) - budget)
        k += 1
        while k < len(starts) - 1 and estimate[starts[k]] > target:
            k += 1
    if best is None:
        while k < len(starts) - 1 and len(ids) > budget:  # out of renders: take the newest turns
            k += 1
            ids = render(starts[k])
        if len(ids) > budget:
            raise _too_long(f"the prompt needs {len(ids)} tokens", budget, context_length, max_tokens)
        best = (starts[k], ids)
    start_at, ids = best
    return Prompt(ids, oldest + start_at)


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
    backend = engine.backend
    if getattr(backend, "accepts_images", False):
        return _start_vision(engine, backend, offer.id, chat)
    # a stored conversation's earlier images ("stored") are context a text model simply does not see
    if any(m.get("images") and not m.get("stored") for m in chat.messages):
        seeing = models.accepting_images()
        raise InvalidRequest(
            f"the model {offer.id} cannot see images; "
            + (
                f"models that can: {', '.join(seeing)} (choose one with 'model')"
                if seeing
                else "no model offered here reads images (add one to MODELS, e.g. "
                "HuggingFaceTB/SmolVLM-500M-Instruct)"
            ),
            param="images",
        )
    prompt = build_prompt(
        engine.tokenizer,
        [_text(m) for m in chat.messages],
        context_length=engine.context_length,
        max_tokens=chat.options.max_tokens,
    )
    generation = engine.submit(prompt.ids, chat.options)
    return Started(generation, offer.id, prompt.dropped_messages)


def _text(message: dict[str, Any]) -> dict[str, str]:
    """A turn as a chat template takes it: role and content (no images, no stored meta)."""
    return {"role": message["role"], "content": message["content"]}


def _start_vision(engine: Any, backend: Any, model: str, chat: ChatRequest) -> Started:
    """The prompt of a vision model: its processor renders the turns and the pixels together. The
    oldest turns are dropped (their images with them) until prompt + reply fit the context."""
    from .inference.vision import VisionOptions  # only here: a vision model is loaded, so torch is

    budget = engine.context_length - chat.options.max_tokens
    system = chat.messages[:1] if chat.messages[0]["role"] == "system" else []
    turns = chat.messages[len(system) :]
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"] or [0]
    for k, first in enumerate(starts):
        if k < len(starts) - 1 and k >= _MAX_RENDERS - 1:
            first = starts[-1]  # out of renders: keep the newest turn alone
        ids, inputs = backend.prepare(
            [
                {**_text(m), "images": [p.pixels() for p in m.get("images") or ()]}
                for m in system + turns[first:]
            ]
        )
        if len(ids) <= budget:
            break
        if first == starts[-1]:
            raise _too_long(
                f"the prompt needs {len(ids)} tokens (images included)",
                budget,
                engine.context_length,
                chat.options.max_tokens,
            )
    images = sum(len(m.get("images") or ()) for m in turns[first:])
    options = VisionOptions(
        **{f: getattr(chat.options, f) for f in SamplingOptions.__dataclass_fields__},
        inputs=inputs,
        images=images,
    )
    generation = engine.submit(ids, options)
    return Started(generation, model, first)
