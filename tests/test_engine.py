"""The engine without HTTP: real Transformers generation on the tiny model."""

from __future__ import annotations

import threading

import pytest

from service.dev.tiny_models import build_tiny_model
from service.errors import ModelUnavailable, QueueFull
from service.inference.backend import TransformersBackend
from service.inference.engine import Engine, Finished, SamplingOptions
from service.inference.text import IncrementalDetokenizer, StopScanner
from tests.support.engines import PromptReadingBackend, ScriptedBackend, ready_engine


def prompt(backend, text: str = "Hello there") -> list[int]:
    return backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
    )


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


def greedy_tokens(backend, ids, n: int) -> list[int]:
    seq, first = backend.admit(ids, SamplingOptions(max_tokens=n, temperature=0))
    tokens = [first] + [backend.step()[0] for _ in range(n - 1)]
    backend.release(seq)
    return tokens


def test_stops_at_eos(tiny_model_dir, tmp_path):
    # Find a token the model produces greedily, then build the same model with that token as EOS.
    ids = prompt(TransformersBackend(str(tiny_model_dir)))
    produced = greedy_tokens(TransformersBackend(str(tiny_model_dir)), ids, 6)
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


def test_generation_config_defaults_are_honoured(tiny_model_dir):
    """The model's own sampling settings apply unless a request overrides them."""
    backend = TransformersBackend(str(tiny_model_dir))
    ids = prompt(backend)

    def settings(options):
        seq, _ = backend.admit(ids, options)
        backend.release(seq)
        found = {type(p).__name__: p for p in [*seq.penalties, *seq.warpers]}
        return seq.greedy, {
            "repetition_penalty": found["RepetitionPenaltyLogitsProcessor"].penalty,
            "temperature": getattr(found.get("TemperatureLogitsWarper"), "temperature", None),
            "top_k": seq.top_k or None,
            "top_p": getattr(found.get("TopPLogitsWarper"), "top_p", None),
        }

    assert settings(SamplingOptions(max_tokens=2)) == (
        False,
        {"repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8},
    )
    assert settings(SamplingOptions(max_tokens=2, temperature=1.3, top_p=0.5)) == (
        False,
        {"repetition_penalty": 1.05, "temperature": 1.3, "top_k": 20, "top_p": 0.5},
    )
    assert settings(SamplingOptions(max_tokens=2, temperature=0)) == (
        True,
        {"repetition_penalty": 1.05, "temperature": None, "top_k": None, "top_p": None},
    )


def test_cancel_stops_between_tokens(endless_model_dir):
    class Counting(TransformersBackend):
        """Counts decode steps, so the test knows how many tokens existed when it cancelled."""

        steps = 0

        def step(self):
            tokens = super().step()
            Counting.steps += 1
            return tokens

    backend = Counting(str(endless_model_dir))
    engine = ready_engine(backend)
    generation = engine.submit(prompt(backend), SamplingOptions(max_tokens=3000))
    events = generation.events()
    next(events)
    generation.cancel()
    made_by_cancel = 1 + Counting.steps  # the prefill's token, then one per step
    finished = [e for e in events if isinstance(e, Finished)][0]
    assert finished.finish_reason == "cancelled"
    # At most the step under way when cancel() came still completes; nothing after it.
    assert finished.usage.completion_tokens <= made_by_cancel + 1
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
    with pytest.raises(ModelUnavailable):
        engine.submit([1, 2], SamplingOptions(max_tokens=1))


def test_a_failing_generation_is_reported_and_the_engine_goes_on(tiny_backend):
    class Flaky(ScriptedBackend):
        calls = 0

        def admit(self, *args):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("out of memory")
            return super().admit(*args)

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


@pytest.mark.parametrize(
    "pieces,stops,expected,hit",
    [
        (["Hello", " wor", "ld"], ("world",), "Hello ", True),
        (["a", "b", "c"], ("x",), "abc", False),
        (["ab", "c", "d"], ("cd", "bc"), "a", True),
        (["The en", "d is near"], ("END",), "The end is near", False),
        (["wait<", "|stop"], ("<|stop|>",), "wait<|stop", False),  # a near miss is released at the end
        (["x", ""], (), "x", False),
    ],
)
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


PROMPTS = ["Hi", "Tell me about Docker and containers", "café 🙂", "A much longer prompt " * 12]


def test_batched_decoding_matches_one_at_a_time(tiny_model_dir):
    """Requests that join a running batch at different moments, with different prompt lengths,
    get exactly the tokens they get alone (float32 so no rounding can flip an argmax)."""
    alone = TransformersBackend(str(tiny_model_dir), dtype="float32")
    expected = {p: greedy_tokens(alone, prompt(alone, p), 12) for p in PROMPTS}

    batched = TransformersBackend(str(tiny_model_dir), dtype="float32", max_batch=4)
    got: dict[str, list[int]] = {}
    running: dict[str, tuple] = {}
    schedule = {0: PROMPTS[:2], 3: PROMPTS[2:3], 5: PROMPTS[3:]}  # step -> prompts joining then
    step = 0
    while len(got) < len(PROMPTS):
        for p in schedule.get(step, []):
            seq, first = batched.admit(prompt(batched, p), SamplingOptions(max_tokens=12, temperature=0))
            running[p] = (seq, [first])
        if running:
            for (p, (seq, tokens)), token in zip(list(running.items()), batched.step(), strict=True):
                tokens.append(token)
                if len(tokens) == 12:
                    batched.release(seq)
                    got[p] = tokens
                    del running[p]
        step += 1
    assert got == expected
    assert batched.batch_size == 0


def test_a_prompt_read_in_chunks_leaves_the_same_cache_and_tokens(tiny_model_dir, monkeypatch):
    """Long prompts are read PREFILL_CHUNK tokens at a time; 7 here, so a ~30-token prompt takes
    several chunks, each at its own positions and attending to the ones before it."""
    import torch

    from service.inference import backend as backend_module

    def read(backend: TransformersBackend, ids: list[int]):
        seq, first = backend.admit(ids, SamplingOptions(max_tokens=8, temperature=0))
        cache = [(layer.keys.clone(), layer.values.clone()) for layer in backend._cache.layers]
        tokens = [first] + [backend.step()[0] for _ in range(7)]
        backend.release(seq)
        return cache, tokens

    ids = prompt(TransformersBackend(str(tiny_model_dir))) * 2
    assert len(ids) > 3 * 7
    whole_cache, whole_tokens = read(TransformersBackend(str(tiny_model_dir), dtype="float32"), ids)
    monkeypatch.setattr(backend_module, "PREFILL_CHUNK", 7)
    monkeypatch.setattr(backend_module, "LONE_PREFILL_CHUNK", 7)  # admit on an empty batch reads lone pieces
    cache, tokens = read(TransformersBackend(str(tiny_model_dir), dtype="float32"), ids)
    assert tokens == whole_tokens
    for (k, v), (wk, wv) in zip(cache, whole_cache, strict=True):
        torch.testing.assert_close(k, wk, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, wv, atol=1e-5, rtol=1e-4)


def test_a_lone_prompt_is_read_in_one_pass_and_in_pieces_while_a_chat_decodes(tiny_model_dir, monkeypatch):
    """Pieces exist to let running chats decode between them: with an empty batch a prompt is read
    `LONE_PREFILL_CHUNK` tokens a pass (here all of it at once), with a chat decoding
    `PREFILL_CHUNK` (7 here), and both ways give the tokens of a whole-prompt read."""
    from service.inference import backend as backend_module

    monkeypatch.setattr(backend_module, "PREFILL_CHUNK", 7)
    backend = TransformersBackend(str(tiny_model_dir), dtype="float32")
    greedy = SamplingOptions(max_tokens=4, temperature=0)
    ids = prompt(backend) * 2
    assert 3 * 7 < len(ids) <= backend_module.LONE_PREFILL_CHUNK
    lone = backend.begin(ids, greedy)
    first = backend.prefill(lone)
    assert first is not None and backend.unread(lone) == 0 and backend.batch_size == 1
    other = backend.begin(ids[:-3], greedy)
    reads = []
    while (token := backend.prefill(other)) is None:
        reads.append(backend.unread(other))
        backend.step()  # the running chat gets its token between two pieces
    assert reads[:2] == [len(ids) - 3 - 7, len(ids) - 3 - 14]
    fresh = TransformersBackend(str(tiny_model_dir), dtype="float32")
    assert [first, token] == [greedy_tokens(fresh, ids, 1)[0], greedy_tokens(fresh, ids[:-3], 1)[0]]


def test_next_turn_reuses_the_conversation_kv_cache(tiny_model_dir):
    backend = TransformersBackend(str(tiny_model_dir), dtype="float32")
    turns = [{"role": "user", "content": "First question about Docker images"}]
    ids = backend.tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=False)
    reply = greedy_tokens(backend, ids, 10)
    turns += [
        {"role": "assistant", "content": backend.tokenizer.decode(reply, skip_special_tokens=True)},
        {"role": "user", "content": "And a follow-up"},
    ]
    ids2 = backend.tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=False)
    seq, first = backend.admit(ids2, SamplingOptions(max_tokens=8, temperature=0))
    assert seq.reused >= len(ids)  # the first turn was not read again
    continued = [first] + [backend.step()[0] for _ in range(7)]
    backend.release(seq)
    fresh = TransformersBackend(str(tiny_model_dir), dtype="float32")
    assert continued == greedy_tokens(fresh, ids2, 8)


def test_concurrent_requests_share_the_batch(tiny_model_dir, endless_model_dir):
    engine = ready_engine(TransformersBackend(str(endless_model_dir), max_batch=3))
    ids = prompt(engine.backend)
    gens = [engine.submit(ids, SamplingOptions(max_tokens=200, seed=i)) for i in range(4)]
    first_events = [next(g.events()) for g in gens[:3]]
    assert all(isinstance(e, str) for e in first_events)
    assert engine.stats()["active"] == 3  # the fourth waits for room
    results = [g.result()[1] for g in gens]
    assert [r.finish_reason for r in results] == ["length"] * 4
    assert engine.stats()["active"] == 0


def agreement_with_bf16(quantized: TransformersBackend, model_dir) -> float:
    """Teacher-forced over a real sentence: the share of positions where `quantized` picks the same
    next token as the bf16 model."""
    import torch

    ref = TransformersBackend(str(model_dir), dtype="bfloat16")
    ids = torch.tensor(
        [
            ref.tokenizer(
                "Docker packages an application and everything it needs into one "
                "image. The quick brown fox jumps over the lazy dog."
            )["input_ids"]
        ]
    )
    with torch.inference_mode():
        same = ref.model(ids).logits.argmax(-1) == quantized.model(ids).logits.argmax(-1)
    return float(same.float().mean())


def test_int8_picks_the_same_next_tokens_as_bf16(tiny_model_dir):
    """Teacher-forced over a real sentence, int8's next-token choice matches bf16's at >= 90% of
    positions. Per-row int8 rounds each weight to within 1/254 of its row's largest, so only near-ties
    may flip; a broken quantizer agrees at about 1 position in the vocabulary size."""
    q8 = TransformersBackend(str(tiny_model_dir), dtype="int8")
    assert any(type(m).__name__ == "Int8Linear" for m in q8.model.modules())
    assert agreement_with_bf16(q8, tiny_model_dir) >= 0.9
    text, finished = ready_engine(q8).submit(prompt(q8), SamplingOptions(max_tokens=5, seed=1)).result()
    assert finished.usage.completion_tokens >= 1


@pytest.mark.parametrize("kernels", ["compiled", "fallback"])
@pytest.mark.parametrize("dtype,least", [("int8", 0.9), ("int4", 0.8)])
def test_decoding_one_token_at_a_time_picks_the_same_next_tokens_as_bf16(
    tiny_model_dir, monkeypatch, kernels, dtype, least
):
    """The decode kernels (one row per step, through the KV cache), compiled and PyTorch's own
    fallback, agree with bf16's full forward as the whole-prompt test above does."""
    import torch
    from transformers import DynamicCache

    from service.inference import kernels as compiled
    from service.inference import quantized

    if kernels == "compiled" and not compiled.available():
        pytest.skip("no compiled kernels here")
    plan = quantized.choose_kernels(compiled=kernels == "compiled")
    monkeypatch.setattr(quantized, "kernel_plan", lambda: plan)
    backend = TransformersBackend(str(tiny_model_dir), dtype=dtype)
    ref = TransformersBackend(str(tiny_model_dir), dtype="bfloat16")
    ids = torch.tensor(
        [ref.tokenizer("Docker packages an application and everything it needs into one image.")["input_ids"]]
    )
    with torch.inference_mode():
        want = ref.model(ids).logits.argmax(-1)[0]
        cache, got = DynamicCache(), []
        for position in range(ids.shape[1]):
            out = backend.model(
                input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True
            )
            cache = out.cache
            got.append(int(out.logits[0, -1].argmax()))
    assert float((torch.tensor(got) == want).float().mean()) >= least


def test_sampling_among_the_top_k_is_transformers_distribution(tiny_backend):
    """Temperature and top-p applied to the k best scores only give the distribution Transformers'
    chain (temperature, top-k, top-p over the whole vocabulary) gives."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from service.inference.backend import Sequence

    seq = Sequence([1, 2, 3], SamplingOptions(max_tokens=1, temperature=0.7, top_p=0.8))
    tiny_backend._setup_sampling(seq)
    assert seq.top_k == 20  # Qwen2.5's generation_config, which the tiny model copies
    scores = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3)) * 0.5
    probs, ids = tiny_backend.distribution(seq, scores)
    ours = torch.zeros(1, 1000).index_put_((torch.zeros_like(ids[0]), ids[0]), probs[0])
    chain = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    torch.testing.assert_close(ours, torch.softmax(chain(None, scores.clone()), dim=-1))
    assert 1 < int((ours > 0).sum()) < 20  # top-p did cut some of the 20


def test_int4_fallback_packing_computes_with_the_weights_it_was_given():
    """The stored int4 form packed for PyTorch's own int4 kernel (the path without the compiled
    kernels) against a plain float reference of the same 4-bit rounding (w = q × scale + low per
    group of inputs): layout, scales and offsets, over a block of 64 rows and then 32."""
    import torch

    from service.inference.quantized import pack_int4_for_aten, quantize_int4_groups

    torch.manual_seed(0)
    weight = torch.randn(96, 256) * torch.linspace(0.1, 3, 256)  # groups of different ranges
    groups = weight.view(96, 4, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    dequantized = (((groups - low) / scale).round() * scale + low).view(96, 256)
    packed, scales_zeros = pack_int4_for_aten(*quantize_int4_groups(weight, 64, chunk=64))
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, scales_zeros).float()
    want = x.float() @ dequantized.T
    assert (got - want).norm() / want.norm() < 0.02  # bf16 activations, scales and offsets
    exact = x.float() @ weight.T
    assert 0.01 < (got - exact).norm() / exact.norm() < 0.15  # it is 4-bit, and only that far off


def test_int4_picks_mostly_the_same_next_tokens_as_bf16(tiny_model_dir):
    """int4 rounds each weight to 1/15 of its group's range (int8: 1/254 of its row's largest), so
    near-ties flip more often: >= 80% of positions (seen: 96-100% over four random tiny models;
    a broken packing agrees at about 1 position in the vocabulary size)."""
    q4 = TransformersBackend(str(tiny_model_dir), dtype="int4")
    assert sum(type(m).__name__ == "Int4Linear" for m in q4.model.modules()) == 2 * 7  # 2 layers
    assert type(q4.model.lm_head).__name__ == "Int8Linear"  # a vocabulary of 1,0xx: not a multiple of 16
    assert agreement_with_bf16(q4, tiny_model_dir) >= 0.8
    text, finished = ready_engine(q4).submit(prompt(q4), SamplingOptions(max_tokens=5, seed=1)).result()
    assert finished.usage.completion_tokens >= 1


def test_int8_embedding_rows_are_the_checkpoint_rows_to_within_rounding(tiny_model_dir):
    """The int8 table (which the tied head shares) gives back each row within half a step."""
    import torch

    ref = TransformersBackend(str(tiny_model_dir), dtype="float32").model.get_input_embeddings().weight
    table = TransformersBackend(str(tiny_model_dir), dtype="int8").model.get_input_embeddings()
    assert type(table).__name__ == "Int8Embedding" and table.values.dtype == torch.int8
    ids = torch.tensor([[0, 5, 17, ref.shape[0] - 1]])
    got, want = table(ids).float()[0], ref[ids[0]].float()
    step = want.abs().amax(dim=1, keepdim=True) / 127
    assert ((got - want).abs() <= step * 0.5 + want.abs() / 128).all()  # rounding + bf16 output


def test_decode_attention_matches_sdpa_with_padding_and_grouped_heads():
    """The one-query path computes what PyTorch's `sdpa` does: same heads grouping (12 query heads
    over 2 key/value heads, as Qwen2.5-1.5B), a left-padded row masked out, float32 exact-ish."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from service.inference.attention import attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 6, True
    query = torch.randn(3, 12, 1, 16)
    key, value = torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # row 1 is padded on the left
    ours, _ = attention(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (3, 1, 12, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    changed = value.clone()
    changed[1, :, :4] = 100.0  # what the mask hides cannot change the answer
    torch.testing.assert_close(attention(module, query, key, changed, mask, scaling=0.25)[0][1], ours[1])


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bf16_attention_matches_sdpa_whichever_products_the_cpu_does_fast(fast_bf16, monkeypatch):
    """bf16 inputs: products in bf16 where AVX-512 BF16 makes them fast, float32 elsewhere."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from service.inference import attention as attention_module

    monkeypatch.setattr(attention_module, "fast_bf16_products", lambda: fast_bf16)
    torch.manual_seed(2)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 6, True
    query = torch.randn(2, 12, 1, 64, dtype=torch.bfloat16)
    key, value = (torch.randn(2, 2, 40, 64, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    ours, _ = attention_module.attention(module, query, key, value, mask)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("explicit_mask", [True, False])
def test_short_prompt_attention_matches_sdpa_over_a_cached_history(explicit_mask):
    """A next turn: 5 new queries over 9 keys (4 cached), causal among the new ones, with the mask
    given or left to the function (Transformers passes None when plain causal will do)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from service.inference.attention import attention

    torch.manual_seed(1)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 6, True
    query, key, value = torch.randn(1, 12, 5, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    causal = torch.ones(5, 9, dtype=torch.bool).tril(4)[None, None]
    ours, _ = attention(module, query, key, value, causal if explicit_mask else None, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, causal, scaling=0.25)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_unknown_precision_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="int3"):
        TransformersBackend(str(tiny_model_dir), dtype="int3")


def test_an_abandoned_generation_is_cancelled(scripted):
    """`abandoned` is asked while the caller waits, even while events keep arriving, and cancels."""
    engine = scripted("word " * 500, delay=0.02)
    gone = {"flag": False}
    running = engine.submit([1, 2, 3], SamplingOptions(max_tokens=400))
    waiting = engine.submit([1, 2, 3], SamplingOptions(max_tokens=400))
    events = running.events(abandoned=lambda: gone["flag"], poll=0.05)
    assert isinstance(next(events), str)  # generating
    gone["flag"] = True
    *_, finished = events
    assert finished.finish_reason == "cancelled" and finished.usage.completion_tokens < 100
    _, finished = waiting.result(abandoned=lambda: True, poll=0.05)
    assert finished.finish_reason == "cancelled"


def where(log, entry) -> int:
    return log.index(entry)


def test_four_prompts_sent_together_all_start_before_any_chat_has_64_tokens(tiny_backend):
    """Four chats of 256-token prompts, read 64 tokens a piece: every first token comes before any
    chat's 64th, and a chat already answering gets a token between two pieces of the next prompt."""
    hold = threading.Event()
    backend = PromptReadingBackend(tiny_backend.tokenizer, chunk=64, hold=hold)
    engine = ready_engine(backend)
    gens = [engine.submit([5] * 256, SamplingOptions(max_tokens=100)) for _ in range(4)]
    hold.set()
    results = [g.result()[1] for g in gens]
    assert [r.usage.completion_tokens for r in results] == [100] * 4
    assert all(r.usage.prompt_tokens == 256 and r.timing.ttft_s is not None for r in results)
    log = backend.log
    firsts = [where(log, ("token", c, 1)) for c in range(4)]
    sixty_fourths = [where(log, ("token", c, 64)) for c in range(4)]
    assert max(firsts) < min(sixty_fourths)
    assert sorted(firsts) == firsts  # equal prompts: read one after the other, not all at the end
    for chat in (1, 2, 3):
        pieces = [i for i, e in enumerate(log) if e[:2] == ("piece", chat)]
        assert len(pieces) == 4
        for a, b in zip(pieces, pieces[1:], strict=False):
            assert ("token", 0) in {e[:2] for e in log[a:b]}  # chat 0 answered meanwhile


def test_a_short_prompt_is_read_before_a_long_one_already_being_read(tiny_backend):
    """Shortest unread first: a next turn's few tokens do not wait behind a long prompt."""
    submitted = []

    def on_piece(chat):
        if chat.number == 0 and len([e for e in backend.log if e[0] == "piece"]) == 2:
            submitted.append(engine.submit([5] * 10, SamplingOptions(max_tokens=3)))

    backend = PromptReadingBackend(tiny_backend.tokenizer, chunk=64, on_piece=on_piece)
    engine = ready_engine(backend)
    long = engine.submit([5] * 640, SamplingOptions(max_tokens=3))
    assert long.result()[1].usage.completion_tokens == 3
    assert submitted[0].result()[1].usage.completion_tokens == 3
    pieces = [e[1] for e in backend.log if e[0] == "piece"]
    assert pieces == [0, 0, 1] + [0] * 8


def test_a_prompt_passed_over_too_often_is_read_next(tiny_backend, monkeypatch):
    """Short prompts arriving one after another cannot hold a long one back for ever."""
    from service.inference import engine as engine_module

    monkeypatch.setattr(engine_module, "STARVATION_LIMIT", 3)
    extra = []

    def on_piece(chat):
        if chat.number != 0 and len(extra) < 12:  # each short one brings the next
            extra.append(engine.submit([5] * 10, SamplingOptions(max_tokens=1)))

    backend = PromptReadingBackend(tiny_backend.tokenizer, chunk=10, on_piece=on_piece, max_batch=2)
    engine = ready_engine(backend)
    long = engine.submit([5] * 100, SamplingOptions(max_tokens=1))
    extra.append(engine.submit([5] * 10, SamplingOptions(max_tokens=1)))
    assert long.result()[1].finish_reason == "length"
    assert all(g.result()[1].finish_reason == "length" for g in extra)
    pieces = [e[1] for e in backend.log if e[0] == "piece"]
    long_at = [i for i, c in enumerate(pieces) if c == 0]
    assert len(long_at) == 10
    assert max(b - a for a, b in zip(long_at, long_at[1:], strict=False)) <= 4  # 3 others at most


def test_a_cancelled_prompt_stops_being_read_at_once_and_the_others_go_on(tiny_backend):
    hold = threading.Event()
    gens = []

    def on_piece(chat):
        if chat.number == 1 and chat.unread == 256 - 2 * 64:
            gens[1].cancel()  # during its second piece

    backend = PromptReadingBackend(tiny_backend.tokenizer, chunk=64, on_piece=on_piece, hold=hold)
    engine = ready_engine(backend)
    gens += [engine.submit([5] * 256, SamplingOptions(max_tokens=20)) for _ in range(3)]
    hold.set()
    finished = [g.result()[1] for g in gens]
    assert [f.finish_reason for f in finished] == ["length", "cancelled", "length"]
    assert finished[1].usage.completion_tokens == 0 and finished[1].timing.ttft_s is None
    log = backend.log
    pieces = [i for i, e in enumerate(log) if e[:2] == ("piece", 1)]
    assert [log[i] for i in pieces] == [("piece", 1, 64)] * 2
    assert log[pieces[-1] + 1][:2] == ("token", 0) and log[pieces[-1] + 2] == ("release", 1)
    assert engine.stats()["active"] == 0 and engine.stats()["cancelled"] == 1


def test_a_failing_piece_is_reported_to_its_request_and_the_engine_goes_on(tiny_backend):
    class Failing(PromptReadingBackend):
        def prefill(self, chat):
            if chat.number == 0 and chat.unread < 256:
                raise RuntimeError("out of memory")
            return super().prefill(chat)

    engine = ready_engine(Failing(tiny_backend.tokenizer, chunk=64))
    _, first = engine.submit([5] * 256, SamplingOptions(max_tokens=5)).result()
    assert first.finish_reason == "error" and "out of memory" in first.error
    _, second = engine.submit([5] * 256, SamplingOptions(max_tokens=5)).result()
    assert (second.finish_reason, second.usage.completion_tokens) == ("length", 5)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_prompts_read_in_pieces_between_decode_steps_give_the_tokens_of_reading_them_at_once(
    tiny_model_dir, monkeypatch, temperature
):
    """The real backend, driven as the engine drives it: prompts of several 7-token pieces (one of
    them a next turn whose history comes from the prefix cache) read one piece at a time with a
    decode step of the running batch after each, get exactly the tokens each gets when its whole
    prompt is read at once, alone (float32, so no rounding can flip a choice). Greedy, and sampled
    with a seed: the tiny random model's greedy choice is its last input token again and again, so
    sampling is what shows a wrong cache (a position off by one changes every distribution)."""
    import torch

    from service.inference import backend as backend_module

    greedy = SamplingOptions(max_tokens=10, temperature=temperature, top_p=1.0, seed=3)
    alone = TransformersBackend(str(tiny_model_dir), dtype="float32")
    first_turn = prompt(alone, "First question about Docker images and their layers")
    first_reply = greedy_tokens(alone, first_turn, 10)
    next_turn = first_turn + first_reply + prompt(alone, "And a follow-up about volumes, please")
    texts = ["Tell me about Docker and containers", "A much longer prompt " * 6]
    prompts = [prompt(alone, t) for t in texts] + [next_turn]

    def kv(backend: TransformersBackend, seq) -> list:
        """The released sequence's keys and values, as its next turn would reuse them."""
        return backend.prefix_cache._entries[tuple(seq.prompt_ids + seq.generated[:-1])]

    def at_once(ids: list[int]) -> tuple[list[int], list]:
        fresh = TransformersBackend(str(tiny_model_dir), dtype="float32")
        seq, first = fresh.admit(ids, greedy)
        tokens = [first] + [fresh.step()[0] for _ in range(9)]
        fresh.release(seq)
        return tokens, kv(fresh, seq)

    expected, expected_kv = zip(*[at_once(p) for p in prompts], strict=True)
    if temperature:
        assert all(len(set(tokens)) > 3 for tokens in expected)  # it can tell a different cache

    monkeypatch.setattr(backend_module, "PREFILL_CHUNK", 7)
    monkeypatch.setattr(backend_module, "LONE_PREFILL_CHUNK", 7)
    backend = TransformersBackend(str(tiny_model_dir), dtype="float32")
    assert greedy_tokens(backend, first_turn, 10) == first_reply  # now in its prefix cache
    assert all(len(p) > 3 * 7 for p in prompts)
    reading = {i: backend.begin(p, greedy) for i, p in enumerate(prompts)}
    assert reading[2].reused >= len(first_turn) and backend.unread(reading[2]) < len(next_turn) - 20
    running: dict = {}  # in the order they joined the batch, as step() answers
    got: dict[int, list[int]] = {}
    released = {}
    pieces = 0
    while reading or running:
        if reading:  # one piece of the prompt with the fewest tokens left, as the engine picks
            i = min(reading, key=lambda i: backend.unread(reading[i]))
            token = backend.prefill(reading[i])
            pieces += 1
            if token is not None:
                running[i], got[i] = reading.pop(i), [token]
        if running:
            for i, token in zip(list(running), backend.step(), strict=True):
                got[i].append(token)
                if len(got[i]) == 10:
                    released[i] = running.pop(i)
                    backend.release(released[i])
    assert pieces >= 3 * len(prompts)
    assert [got[i] for i in range(len(prompts))] == list(expected)
    assert backend.batch_size == 0
    for i, want in enumerate(expected_kv):  # the cache itself, which a sampled token might not show
        for (k, v), (wk, wv) in zip(kv(backend, released[i]), want, strict=True):
            torch.testing.assert_close(k, wk, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, wv, atol=1e-5, rtol=1e-4)


def test_engine_reads_prompts_in_pieces_and_each_chat_gets_its_tokens_alone(tiny_model_dir, monkeypatch):
    """Through the engine on the real backend: three chats sent together, prompts read 7 tokens a
    piece, each writes the text it writes alone (sampled with its seed), with its usage counted."""
    from service.inference import backend as backend_module

    alone = ready_engine(TransformersBackend(str(tiny_model_dir), dtype="float32"))
    texts = ["Hi there, how are you today?", "Tell me about Docker and containers", "A longer one " * 8]
    seeded = SamplingOptions(max_tokens=12, temperature=1.0, top_p=1.0, seed=5)
    prompts = [prompt(alone.backend, t) for t in texts]
    expected = [alone.submit(p, seeded).result() for p in prompts]
    assert len({text for text, _ in expected}) == 3

    monkeypatch.setattr(backend_module, "PREFILL_CHUNK", 7)
    engine = ready_engine(TransformersBackend(str(tiny_model_dir), dtype="float32"))
    gens = [engine.submit(p, seeded) for p in prompts]
    results = [g.result() for g in gens]
    assert [text for text, _ in results] == [text for text, _ in expected]
    assert [f.usage for _, f in results] == [f.usage for _, f in expected]
    assert all(f.timing.ttft_s is not None and f.timing.ttft_s <= f.timing.total_s for _, f in results)
