"""The engine without HTTP: real Transformers generation on the tiny model."""

from __future__ import annotations

import threading

import pytest

from service.engine import (
    Engine,
    EngineUnavailable,
    Finished,
    IncrementalDetokenizer,
    QueueFull,
    SamplingOptions,
    StopScanner,
    TransformersBackend,
)
from tests.conftest import ready_engine
from tests.scripted import ScriptedBackend
from tests.tiny_model import build_tiny_model


def prompt(backend, text: str = "Hello there") -> list[int]:
    return backend.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, return_dict=False)


def test_streams_deltas_then_finished_with_usage_and_timing(engine, tiny_backend):
    ids = prompt(tiny_backend)
    events = list(engine.submit(ids, SamplingOptions(max_tokens=12, seed=1)).events())
    *deltas, finished = events
    assert isinstance(finished, Finished)
    assert deltas and all(isinstance(d, str) and d for d in deltas)
    assert finished.usage.prompt_tokens == len(ids)
    assert 1 <= finished.usage.completion_tokens <= 12
    assert finished.usage.total_tokens == len(ids) + finished.usage.completion_tokens
    t = finished.timing
    assert 0 <= t.queued_s <= t.ttft_s <= t.total_s
    if finished.usage.completion_tokens > 1:
        assert t.tokens_per_s > 0


def test_max_tokens_gives_length(endless_model_dir):
    backend = TransformersBackend(str(endless_model_dir))
    engine = ready_engine(backend)
    text, finished = engine.submit(prompt(backend), SamplingOptions(max_tokens=7)).result()
    assert finished.finish_reason == "length"
    assert finished.usage.completion_tokens == 7


def test_stops_at_eos(tiny_backend, tmp_path):
    # Find a token the model produces greedily, then build the same model with that token as EOS.
    ids = prompt(tiny_backend)
    produced: list[int] = []
    tiny_backend.generate(ids, SamplingOptions(max_tokens=6, temperature=0), produced.append,
                          threading.Event())
    stop_token = produced[3]
    backend = TransformersBackend(str(build_tiny_model(tmp_path, eos_token_ids=[stop_token])))
    assert backend.eos_token_ids == {stop_token}
    _, finished = ready_engine(backend).submit(ids, SamplingOptions(max_tokens=50, temperature=0)).result()
    assert finished.finish_reason == "stop"
    assert finished.usage.completion_tokens == produced.index(stop_token) + 1


def test_seed_makes_sampling_repeatable_and_temperature_zero_is_greedy(engine, tiny_backend):
    ids = prompt(tiny_backend)
    a, _ = engine.submit(ids, SamplingOptions(max_tokens=20, seed=7)).result()
    b, _ = engine.submit(ids, SamplingOptions(max_tokens=20, seed=7)).result()
    assert a == b
    g1, _ = engine.submit(ids, SamplingOptions(max_tokens=20, temperature=0, seed=1)).result()
    g2, _ = engine.submit(ids, SamplingOptions(max_tokens=20, temperature=0, seed=2)).result()
    assert g1 == g2


def test_generation_config_defaults_are_honoured(tiny_backend, monkeypatch):
    """The model's own sampling settings reach generate() unless a request overrides them."""
    seen: dict = {}
    real = tiny_backend.model.generate

    def spy(**kwargs):
        config = tiny_backend.model._prepare_generation_config(None, **{
            k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "streamer",
                                                         "stopping_criteria")})[0]
        seen.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                    repetition_penalty=config.repetition_penalty, do_sample=config.do_sample)
        return real(**kwargs)

    monkeypatch.setattr(tiny_backend.model, "generate", spy)
    ids = prompt(tiny_backend)
    tiny_backend.generate(ids, SamplingOptions(max_tokens=2), lambda t: None, threading.Event())
    assert seen == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                    "do_sample": True}
    tiny_backend.generate(ids, SamplingOptions(max_tokens=2, temperature=1.3, top_p=0.5),
                          lambda t: None, threading.Event())
    assert (seen["temperature"], seen["top_p"], seen["top_k"]) == (1.3, 0.5, 20)
    tiny_backend.generate(ids, SamplingOptions(max_tokens=2, temperature=0), lambda t: None,
                          threading.Event())
    assert seen["do_sample"] is False


def test_cancel_stops_between_tokens(endless_model_dir):
    backend = TransformersBackend(str(endless_model_dir))
    engine = ready_engine(backend)
    generation = engine.submit(prompt(backend), SamplingOptions(max_tokens=3000))
    deltas = 0
    for event in generation.events():
        if isinstance(event, Finished):
            break
        deltas += 1
        if deltas == 3:
            generation.cancel()
    assert event.finish_reason == "cancelled"
    # The token in flight when cancel() was called may still arrive; nothing after it.
    assert event.usage.completion_tokens <= deltas + 2
    assert engine.stats()["cancelled"] == 1
    _, after = engine.submit(prompt(backend), SamplingOptions(max_tokens=3)).result()
    assert after.finish_reason == "length"


def test_queue_is_bounded_and_a_cancelled_waiter_is_skipped(scripted, tiny_backend):
    engine = scripted("one two three four five six", delay=0.05, queue_size=1)
    ids = prompt(tiny_backend)
    running = engine.submit(ids, SamplingOptions(max_tokens=50))
    next(running.events())  # it is on the model now, not in the queue
    waiting = engine.submit(ids, SamplingOptions(max_tokens=50))
    with pytest.raises(QueueFull) as info:
        engine.submit(ids, SamplingOptions(max_tokens=50))
    assert info.value.retry_after >= 1
    waiting.cancel()
    running.cancel()
    assert waiting.result()[1].finish_reason == "cancelled"
    assert engine.stats()["waiting"] == 0


def test_load_failure_is_reported_and_requests_refused():
    def broken():
        raise OSError("no such model folder")
    engine = Engine(broken).start()
    assert engine.wait_ready(5) is False
    assert engine.state == "error" and "no such model folder" in engine.error
    with pytest.raises(EngineUnavailable):
        engine.submit([1, 2], SamplingOptions(max_tokens=1))


def test_a_failing_generation_is_reported_and_the_engine_goes_on(tiny_backend):
    class Flaky(ScriptedBackend):
        calls = 0

        def generate(self, *args):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("out of memory")
            super().generate(*args)

    engine = ready_engine(Flaky(tiny_backend.tokenizer, "fine"))
    _, first = engine.submit([1], SamplingOptions(max_tokens=5)).result()
    assert first.finish_reason == "error" and "out of memory" in first.error
    text, second = engine.submit([1], SamplingOptions(max_tokens=5)).result()
    assert (text, second.finish_reason) == ("fine", "stop")


@pytest.mark.parametrize("text", ["café 日本語 🙂 naïve", "plain ascii", "<script>x</script> & 'q'"])
def test_detokenizer_never_splits_a_character(tiny_backend, text):
    tok = tiny_backend.tokenizer
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in tok.encode(text, add_special_tokens=False)]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_scripted_backend_goes_through_the_same_path(scripted, tiny_backend):
    engine = scripted("<img src=x onerror=alert(1)>")
    text, finished = engine.submit([1], SamplingOptions(max_tokens=100)).result()
    assert text == "<img src=x onerror=alert(1)>"
    assert finished.finish_reason == "stop"


@pytest.mark.parametrize("pieces,stops,expected,hit", [
    (["Hello", " wor", "ld"], ("world",), "Hello ", True),
    (["a", "b", "c"], ("x",), "abc", False),
    (["ab", "c", "d"], ("cd", "bc"), "a", True),
    (["The en", "d is near"], ("END",), "The end is near", False),
    (["wait<", "|stop"], ("<|stop|>",), "wait<|stop", False),   # a near miss is released at the end
    (["x", ""], (), "x", False),
])
def test_stop_scanner(pieces, stops, expected, hit):
    scanner = StopScanner(stops)
    released = [scanner.push(p) for p in pieces]
    released.append(scanner.flush())
    assert "".join(released) == expected
    assert scanner.hit is hit


def test_stop_scanner_never_releases_part_of_a_stop_sequence():
    scanner = StopScanner(("STOP",))
    assert scanner.push("go ST") == "go "
    assert scanner.push("O") == ""
    assert scanner.push("P and more") == ""
    assert scanner.hit


def test_stop_sequence_ends_generation_with_stop(scripted, tiny_backend):
    engine = scripted("First line.\nSecond line.\nThird line.")
    text, finished = engine.submit([1], SamplingOptions(max_tokens=100, stop=("\nSecond",))).result()
    assert text == "First line."
    assert finished.finish_reason == "stop"
    assert finished.usage.completion_tokens < len(tiny_backend.tokenizer.encode("First line.\nSecond line."))
