"""A backend whose "model" says a chosen text, for tests that need to control the output.

It uses a real tokenizer and goes through the engine's real queue, detokenizer and streaming path;
only the forward pass is replaced by the token ids of the script. The browser tests use it to
prove that HTML in a reply stays inert and to hold a reply open long enough to press Stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from service.engine import SamplingOptions


class ScriptedBackend:
    def __init__(self, tokenizer: Any, script: str = "Hello!", *, delay: float = 0.0,
                 name: str = "scripted", context_length: int = 4096):
        self.name = name
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = frozenset([tokenizer.convert_tokens_to_ids("<|im_end|>")])
        self.script = script
        self.delay = delay

    def generate(self, prompt_ids: list[int], options: SamplingOptions,
                 emit: Callable[[int], None], halt: threading.Event) -> None:
        ids = self.tokenizer.encode(self.script, add_special_tokens=False) + sorted(self.eos_token_ids)
        for token_id in ids[:options.max_tokens]:
            if halt.is_set():
                return
            if self.delay:
                time.sleep(self.delay)
            emit(token_id)
