"""Ready engines for tests, and a backend whose "model" says a chosen text, for tests that need to
control the output.

ScriptedBackend uses a real tokenizer and goes through the engine's real queue, batching, detokenizer and
streaming path; only the forward pass is replaced by the token ids of the script. The browser tests
use it to prove that HTML in a reply stays inert and to hold a reply open long enough to press Stop.

PromptReadingBackend reads prompts in pieces as the real one does (the engine's `PromptReader` path)
and writes down, in order, every piece it read and every token it made: the scheduler's order, for
tests of it that count steps instead of timing them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.inference.engine import Engine, SamplingOptions


@dataclass(eq=False)
class _Reading:
    ids: list[int]
    position: int = 0


class ScriptedBackend:
    def __init__(
        self,
        tokenizer: Any,
        script: str = "Hello!",
        *,
        delay: float = 0.0,
        name: str = "scripted",
        context_length: int = 4096,
        max_batch: int = 4,
    ):
        self.name = name
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch = max_batch
        self.eos_token_ids = frozenset([tokenizer.convert_tokens_to_ids("<|im_end|>")])
        self.script = script
        self.delay = delay
        self.batch: list[_Reading] = []

    def _next(self, reading: _Reading) -> int:
        token = reading.ids[min(reading.position, len(reading.ids) - 1)]
        reading.position += 1
        return token

    def admit(self, prompt_ids: list[int], options: SamplingOptions) -> tuple[_Reading, int]:
        reading = _Reading(
            self.tokenizer.encode(self.script, add_special_tokens=False) + sorted(self.eos_token_ids)
        )
        self.batch.append(reading)
        if self.delay:
            time.sleep(self.delay)
        return reading, self._next(reading)

    def step(self) -> list[int]:
        if self.delay:
            time.sleep(self.delay)
        return [self._next(r) for r in self.batch]

    def release(self, reading: _Reading) -> None:
        self.batch.remove(reading)

    def reset(self) -> None:
        self.batch.clear()


@dataclass(eq=False)
class Chat:
    """One sequence in a PromptReadingBackend: `number` counts from 0 in the order they began."""

    number: int
    unread: int
    made: int = 0


class PromptReadingBackend:
    """A model that reads `chunk` prompt tokens per `prefill` and then says `word` until max_tokens.
    `log` holds ("piece", chat, tokens read), ("token", chat, n) for its n-th token, and
    ("release", chat), in the order they happened. `on_piece(chat)` is called (in the engine's thread)
    after each piece; with `hold`, the first `begin` waits for that event, so every request a test
    submits is queued before the scheduler starts on the first."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        chunk: int = 64,
        max_batch: int = 4,
        word: str = " a",
        on_piece: Callable[[Chat], None] | None = None,
        hold: threading.Event | None = None,
    ):
        self.name = "prompt-reading"
        self.tokenizer = tokenizer
        self.context_length = 4096
        self.max_batch = max_batch
        self.eos_token_ids = frozenset([tokenizer.convert_tokens_to_ids("<|im_end|>")])
        self.token = tokenizer.encode(word, add_special_tokens=False)[0]
        self.chunk = chunk
        self.on_piece = on_piece
        self.hold = hold
        self.log: list[tuple[Any, ...]] = []
        self.batch: list[Chat] = []
        self.began = 0

    def admit(self, prompt_ids: list[int], options: SamplingOptions) -> tuple[Chat, int]:
        raise AssertionError("the engine reads a backend's prompts in pieces when it can")

    def begin(self, prompt_ids: list[int], options: SamplingOptions) -> Chat:
        if self.hold is not None and not self.began:
            assert self.hold.wait(30)
        chat = Chat(self.began, len(prompt_ids))
        self.began += 1
        return chat

    def prefill(self, chat: Chat) -> int | None:
        read = min(self.chunk, chat.unread)
        chat.unread -= read
        self.log.append(("piece", chat.number, read))
        if self.on_piece is not None:
            self.on_piece(chat)
        if chat.unread:
            return None
        self.batch.append(chat)
        return self._made(chat)

    def unread(self, chat: Chat) -> int:
        return chat.unread

    def step(self) -> list[int]:
        return [self._made(chat) for chat in self.batch]

    def _made(self, chat: Chat) -> int:
        chat.made += 1
        self.log.append(("token", chat.number, chat.made))
        return self.token

    def release(self, chat: Chat) -> None:
        if chat in self.batch:
            self.batch.remove(chat)
        self.log.append(("release", chat.number))

    def reset(self) -> None:
        self.batch.clear()


def ready_engine(backend, queue_size: int = 8) -> Engine:
    """An engine over `backend`, started, its model loaded (the test fails if loading fails)."""
    engine = Engine(lambda: backend, queue_size=queue_size).start()
    assert engine.wait_ready(30), engine.error
    return engine


def scripted_engine(
    tiny_backend, script: str, delay: float = 0.0, context_length: int = 4096, queue_size: int = 8
) -> Engine:
    """A ready engine whose model says `script` (optionally slowly), with the tiny model's tokenizer."""
    return ready_engine(
        ScriptedBackend(tiny_backend.tokenizer, script, delay=delay, context_length=context_length),
        queue_size=queue_size,
    )
