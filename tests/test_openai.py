"""The official `openai` client, unchanged, against the real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.live import LiveServer


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer({"MODEL_ID": str(tiny_model_dir)}, tmp_path_factory.mktemp("logs") / "gunicorn.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI, tiny_model_dir: Path) -> str:
    ids = [m.id for m in client.models.list()]
    assert ids == [tiny_model_dir.name]
    return ids[0]


def test_non_streaming_completion(client, model):
    r = client.chat.completions.create(
        model=model,
        max_tokens=8,
        seed=1,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == model
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming_and_reports_usage(client, model):
    kwargs = dict(
        model=model,
        max_completion_tokens=12,
        temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_without_usage_option_has_no_usage_chunk(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model, max_tokens=3, stream=True, messages=[{"role": "user", "content": "Hi"}]
        )
    )
    assert all(c.choices for c in chunks)


def _parts(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    "kwargs,error,param,words",
    [
        ({"model": "gpt-4o"}, openai.NotFoundError, "model", "does not exist"),
        ({"n": 2}, openai.BadRequestError, "n", "n must be 1"),
        ({"temperature": "hot"}, openai.BadRequestError, "temperature", "temperature"),
        ({"temperature": 3}, openai.BadRequestError, "temperature", "temperature"),
        ({"user": "bob\x00"}, openai.BadRequestError, "user", "NUL"),
        ({"stop": ["ok", "\x00"]}, openai.BadRequestError, "stop.1", "NUL"),
        (
            {"messages": [{"role": "user", "content": "hi", "name": "a\x00"}]},
            openai.BadRequestError,
            "messages.0.name",
            "NUL",
        ),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens", "max_tokens"),
        ({"max_tokens": 10**6}, openai.BadRequestError, "max_tokens", "at most"),
        ({"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty", "does not support"),
        ({"logprobs": True}, openai.BadRequestError, "logprobs", "does not support"),
        ({"extra_body": {"tools": [{"type": "function"}]}}, openai.BadRequestError, "tools", "Unrecognized"),
        (
            {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
            openai.BadRequestError,
            "messages.0.role",
            "role",
        ),
        (_parts([]), openai.BadRequestError, "messages.0.content", "at least 1"),
        (
            _parts([{"type": "text", "text": ""}]),
            openai.BadRequestError,
            "messages.0.content.0.text",
            "blank",
        ),
        (
            _parts([{"type": "text", "text": "  "}]),
            openai.BadRequestError,
            "messages.0.content.0.text",
            "blank",
        ),
        (
            _parts([{"type": "text", "text": "hi"}, {"type": "text", "text": "a\x00b"}]),
            openai.BadRequestError,
            "messages.0.content.1.text",
            "NUL",
        ),
    ],
)
def test_errors_have_openais_shape(client, model, kwargs, error, param, words):
    args = {"model": model, "messages": [{"role": "user", "content": "Hi"}], **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param
    assert words in body["message"]
    if error is openai.NotFoundError:
        assert body["code"] == "model_not_found" and model in body["message"]
