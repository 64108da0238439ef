"""Ready engines for tests, and a backend whose "model" says a chosen text, for tests that need to
control the output.

ScriptedBackend uses a real tokenizer and goes through the engine's real queue, batching, detokenizer and
streaming path; only the forward pass is replaced by the token ids of the script. The browser tests
use it to prove that HTML in a reply stays inert and to hold a reply open long enough to press Stop.
"""

from __future__ import annotations

import time
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
