"""Building the prompt: the chat template of the kept turns, exactly, at a cost bounded whatever the
conversation's length (a megabyte of history is not read to learn that it cannot fit)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from service.chat import build_prompt
from service.dev.tiny_models import build_tokenizer
from service.errors import PromptTooLong

WORDS = "the quick brown fox jumps over a lazy dog; café 42 naïve 日本語 🙂 <b>x</b> def f():".split()


@pytest.fixture(scope="module", params=["chatml", "zephyr"])
def tokenizer(request, tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp(request.param), style=request.param)


def reference(tokenizer: Any, messages: list[dict[str, str]], budget: int) -> tuple[list[int], int] | None:
    """The rule, spelled out the slow way: drop the oldest turn (then up to a user turn) and render
    the whole rest again until it fits. None when even the newest turn does not."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    while True:
        ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, return_dict=False)
        if len(ids) <= budget:
            return list(ids), dropped
        if len(turns) == 1:
            return None
        turns, dropped = turns[1:], dropped + 1
        while turns[0]["role"] != "user":
            turns, dropped = turns[1:], dropped + 1


def conversation(rng: random.Random, turns: int, *, system: bool, regular: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief. " * rng.randint(1, 5)}] if system else []
    for i in range(turns):
        role = "user" if (i % 2 == turns % 2 - 1 or i == turns - 1) else "assistant"
        if not regular and i < turns - 1:
            role = rng.choice(["user", "assistant"])
        words = rng.choices(WORDS, k=rng.randint(1, 60))
        messages.append({"role": role, "content": " ".join(words)})
    messages[-1]["role"] = "user"
    return messages


class Counting:
    """A tokenizer that counts the characters it is asked to read (tokenize or render), and fails
    the test as soon as they pass `limit`."""

    def __init__(self, tokenizer: Any, limit: float = float("inf")):
        self.inner = tokenizer
        self.chars = 0
        self.limit = limit

    def _read(self, chars: int) -> None:
        self.chars += chars
        assert self.chars <= self.limit, f"read {self.chars} characters, more than {self.limit}"

    def __call__(self, texts, **kwargs):
        self._read(sum(map(len, [texts] if isinstance(texts, str) else texts)))
        return self.inner(texts, **kwargs)

    def encode(self, text, **kwargs):
        self._read(len(text))
        return self.inner.encode(text, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        self._read(sum(len(m["content"]) for m in messages))
        return self.inner.apply_chat_template(messages, **kwargs)


def test_the_prompt_is_the_template_of_the_kept_turns_and_as_long_as_fits(tokenizer):
    rng = random.Random(12)
    for case in range(50):
        regular = case % 3 != 0
        messages = conversation(rng, rng.randint(1, 30), system=case % 2 == 0, regular=regular)
        budget = rng.randint(20, 900)
        expected = reference(tokenizer, messages, budget)
        try:
            prompt = build_prompt(tokenizer, messages, context_length=budget + 10, max_tokens=10)
        except PromptTooLong:
            assert expected is None, case
            continue
        assert expected is not None, case
        assert len(prompt.ids) <= budget
        system = messages[:1] if messages[0]["role"] == "system" else []
        kept = system + messages[len(system) + prompt.dropped_messages :]
        assert prompt.ids == tokenizer.apply_chat_template(
            kept, add_generation_prompt=True, return_dict=False
        )
        if regular:
            assert (prompt.ids, prompt.dropped_messages) == expected, case


def test_the_work_is_bounded_by_the_context_not_the_conversation(tokenizer):
    """1,000 turns (~900 KB) or 100: what is read depends on the room in the context only."""
    budget = 4096 - 512
    read = {}
    for turns in (100, 1000):
        counting = Counting(tokenizer, limit=4 * budget * 16)
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 180}
            for i in range(turns - 1)
        ] + [{"role": "user", "content": "the newest question"}]
        prompt = build_prompt(counting, messages, context_length=4096, max_tokens=512)
        assert len(prompt.ids) <= budget and prompt.dropped_messages > 0
        read[turns] = counting.chars
    assert read[1000] <= read[100] * 1.1


def test_a_megabyte_message_is_refused_without_being_tokenized(tokenizer):
    counting = Counting(tokenizer)
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "x y z " * 150_000},
    ]
    with pytest.raises(PromptTooLong) as refused:
        build_prompt(counting, messages, context_length=4096, max_tokens=100)
    assert counting.chars == 0
    message = refused.value.message
    assert "900000 characters" in message and "4096" in message and "100" in message
