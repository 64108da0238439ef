"""The lean decode step and prompt path (service/inference/decoder.py) against Transformers' own forward.

Every step and every prompt piece the backend reads through the lean path is checked against the
Transformers forward of the same model over a copy of the same cache: the logits and the cache it
leaves must match (to float32 rounding, or for int8/int4 to one step of their activation
quantization), one row alone, a left-padded batch that others join mid-decode, after a release (the
batch re-selected and trimmed), for a sequence that starts from a reused prefix, and for a prompt
read in pieces; for int8 and int4, with the compiled helpers and with the PyTorch fallback.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from service.dev.tiny_models import build_tiny_llama
from service.inference import backend as backend_module
from service.inference import kernels as compiled
from service.inference import quantized
from service.inference.backend import TransformersBackend
from service.inference.decoder import LeanDecoder
from service.inference.engine import SamplingOptions

GREEDY = SamplingOptions(max_tokens=10**6, temperature=0)
# The lean path is for float32 activations; on a CPU with AVX-512 BF16 they would be bf16 (and the
# model's forward runs: test_bf16_activations_keep_the_transformers_forward), so force float32 here.
pytestmark = pytest.mark.usefixtures("float32_activations")


class Compared:
    """The backend's lean step, each call also computed by the Transformers forward on a copy of
    the cache (the reference), with the largest differences kept."""

    def __init__(self, backend: TransformersBackend):
        assert backend.decoder is not None
        self.lean, self.model = backend.decoder, backend.model
        self.steps = self.prefills = 0
        self.logits_error = 0.0
        self.cache_error = 0.0

    def step(self, tokens, positions, mask, layers):
        reference = DynamicCache(
            ddp_cache_data=[(layer.keys.clone(), layer.values.clone()) for layer in layers]
        )
        want = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            cache=reference,
            use_cache=True,
        ).logits[:, -1]
        got = self.lean.step(tokens, positions, mask, layers)
        self.steps += 1
        self.logits_error = max(self.logits_error, float((got - want).abs().max()))
        for mine, theirs in zip(layers, reference.layers, strict=True):
            assert mine.keys.shape == theirs.keys.shape
            error = max(
                float((mine.keys - theirs.keys).abs().max()), float((mine.values - theirs.values).abs().max())
            )
            self.cache_error = max(self.cache_error, error)
        return got

    def prefill(self, tokens, start, cache):
        """The lean prompt piece against the Transformers forward with `logits_to_keep=1` on a copy
        of the same cache (empty, or a reused prefix)."""
        reference = DynamicCache(
            ddp_cache_data=[(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        )
        end = start + tokens.shape[0]
        want = self.model(
            input_ids=tokens[None],
            attention_mask=torch.ones(1, end, dtype=torch.long),
            position_ids=torch.arange(start, end)[None],
            cache=reference,
            use_cache=True,
            logits_to_keep=1,
        ).logits[0, -1]
        got = self.lean.prefill(tokens, start, cache)
        self.prefills += 1
        self.logits_error = max(self.logits_error, float((got - want).abs().max()))
        assert len(cache.layers) == len(reference.layers)
        for mine, theirs in zip(cache.layers, reference.layers, strict=True):
            assert mine.keys.shape == theirs.keys.shape == (1, mine.keys.shape[1], end, mine.keys.shape[3])
            error = max(
                float((mine.keys - theirs.keys).abs().max()), float((mine.values - theirs.values).abs().max())
            )
            self.cache_error = max(self.cache_error, error)
        return got


@pytest.fixture(params=["compiled", "fallback"])
def kernels(request, monkeypatch):
    if request.param == "compiled" and not compiled.available():
        pytest.skip("no compiled kernels here")
    plan = quantized.choose_kernels(compiled=request.param == "compiled")
    monkeypatch.setattr(quantized, "kernel_plan", lambda: plan)
    return request.param


def ids(n: int, start: int = 40) -> list[int]:
    return [(start + i * 37) % 500 + 20 for i in range(n)]  # inside the tiny vocabulary (594)


@pytest.mark.parametrize("dtype", ["int8", "int4", "float32"])
def test_lean_steps_give_the_transformers_logits_alone_batched_released_and_reused(
    tiny_model_dir, kernels, dtype
):
    backend = TransformersBackend(str(tiny_model_dir), dtype=dtype, max_batch=4)
    compared = Compared(backend)
    backend.decoder = compared  # type: ignore[assignment]

    one, _ = backend.admit(ids(30), GREEDY)  # one row alone
    for _ in range(3):
        backend.step()
    two, _ = backend.admit(ids(12, 500), GREEDY)  # shorter: left-padded into the batch
    for _ in range(3):
        backend.step()
    three, _ = backend.admit(ids(70, 300), GREEDY)  # longer: the batch grows its padding
    for _ in range(3):
        backend.step()
    backend.release(three)  # the longest leaves: re-selected and its padding trimmed
    for _ in range(3):
        backend.step()
    backend.release(one)
    history = one.prompt_ids + one.generated[:-1]
    again, _ = backend.admit(history + ids(5, 700), GREEDY)  # the next turn, from the prefix cache
    assert again.reused == len(history)
    for _ in range(3):
        backend.step()
    assert compared.steps == 15
    assert compared.prefills == 4  # each prompt read by the lean path, the last from a reused prefix
    # float32: rounding only. Quantized: the int8/int4 products quantize their activation row, and a
    # difference of one float32 rounding in a norm or a softmax can move one activation across a
    # rounding boundary (one quantization step, measured up to 2.6e-3 on logits of ~1.2); a wrong
    # rotary, mask or cache position moves the logits by their own size.
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    assert compared.logits_error < tolerance
    assert compared.cache_error < tolerance


@pytest.mark.parametrize("dtype", ["int8", "int4", "float32"])
def test_a_prompt_read_in_pieces_gives_the_transformers_logits_and_cache(
    tiny_model_dir, kernels, dtype, monkeypatch
):
    """Pieces after the first attend to the cache before them (a causal mask offset by the past,
    not the plain triangle); the first token and the cache left behind match the forward's."""
    monkeypatch.setattr(backend_module, "PREFILL_CHUNK", 24)
    monkeypatch.setattr(backend_module, "LONE_PREFILL_CHUNK", 24)
    backend = TransformersBackend(str(tiny_model_dir), dtype=dtype)
    compared = Compared(backend)
    backend.decoder = compared  # type: ignore[assignment]
    seq, _ = backend.admit(ids(61, 90), GREEDY)  # pieces of 24, 24 and 13
    assert compared.prefills == 3
    backend.step()
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    assert compared.logits_error < tolerance
    assert compared.cache_error < tolerance


@pytest.mark.parametrize("dtype,weights", [("int8", "values"), ("int4", "q4")])
def test_fused_products_share_the_weights_of_the_layers_they_replace(tiny_model_dir, dtype, weights):
    """q/k/v (and gate/up) become one product over rows concatenated once; the original layers are
    views of them (prompts still use those), so the model holds each weight once."""
    if not compiled.available():
        pytest.skip("no compiled kernels here")
    backend = TransformersBackend(str(tiny_model_dir), dtype=dtype)
    attention = backend.model.model.layers[0].self_attn
    storage = getattr(attention.q_proj, weights).untyped_storage().data_ptr()
    assert getattr(attention.k_proj, weights).untyped_storage().data_ptr() == storage
    assert getattr(attention.v_proj, weights).untyped_storage().data_ptr() == storage
    assert (
        attention.k_proj.scales.untyped_storage().data_ptr()
        == attention.q_proj.scales.untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("dtype,least", [("int8", 0.9), ("int4", 0.8)])
def test_lean_steps_pick_the_same_next_tokens_as_bf16(tiny_model_dir, kernels, dtype, least):
    """Teacher-forced through the backend's own steps (the lean path), the quantized model's next
    token agrees with bf16's full forward as the Transformers path's does (test_engine)."""
    backend = TransformersBackend(str(tiny_model_dir), dtype=dtype)
    assert backend.decoder is not None
    ref = TransformersBackend(str(tiny_model_dir), dtype="bfloat16")
    text = ref.tokenizer("Docker packages an application and everything it needs into one image.")[
        "input_ids"
    ]
    with torch.inference_mode():
        want = ref.model(torch.tensor([text])).logits.argmax(-1)[0].tolist()
    seq, first = backend.admit(text[:1], GREEDY)
    got = [first]
    for token in text[1:]:
        seq.generated[-1] = token  # the sentence's token, not the model's pick, goes in next
        got.append(backend.step()[0])
    assert sum(a == b for a, b in zip(got, want, strict=True)) / len(want) >= least


def test_other_architectures_decode_through_transformers(tmp_path):
    """A model the lean step does not know (Llama here; the vision models too) keeps the plain
    forward, and decodes."""
    backend = TransformersBackend(str(build_tiny_llama(tmp_path / "llama")), dtype="int8")
    assert backend.decoder is None
    assert LeanDecoder.build(backend.model) is None
    seq, first = backend.admit(ids(10), GREEDY)
    assert len(backend.step()) == 1


def test_bf16_activations_keep_the_transformers_forward(tiny_model_dir, monkeypatch):
    """Where bf16 products are fast (AVX-512 BF16, AMX), a quantized model computes in bf16 between
    its products and the lean step, made for float32, stands aside: forced here, so any CPU runs
    the path those CPUs take (slowly, without the instructions)."""
    from service.inference import attention

    monkeypatch.setattr(attention, "fast_bf16_products", lambda: True)
    backend = TransformersBackend(str(tiny_model_dir), dtype="int8")
    assert backend.model.dtype == torch.bfloat16
    assert backend.decoder is None
    float32 = TransformersBackend(str(tiny_model_dir), dtype="float32")
    text = ids(12)
    with torch.inference_mode():
        want = float32.model(torch.tensor([text])).logits.argmax(-1)[0].tolist()
    seq, first = backend.admit(text[:1], GREEDY)
    got = [first]
    for token in text[1:]:
        seq.generated[-1] = token
        got.append(backend.step()[0])
    assert sum(a == b for a, b in zip(got, want, strict=True)) >= 10


def test_compiled_silu_and_norm_match_pytorch_over_a_wide_range():
    """The compiled helpers' own exp and norm against PyTorch's, on values far wider than the tiny
    model's (a real model's activations reach the hundreds)."""
    library = compiled.library()
    if library is None:
        pytest.skip("no compiled kernels here")
    torch.manual_seed(0)
    gate_up = torch.cat([torch.linspace(-120, 120, 4096).view(2, 2048), torch.randn(2, 2048) * 30], dim=1)
    gate, up = gate_up[:, :2048], gate_up[:, 2048:]
    torch.testing.assert_close(library.decode_silu_mul(gate_up), torch.nn.functional.silu(gate) * up)
    many = torch.randn(300, 2 * 1536) * 20  # a prompt's rows, split over the threads
    want = torch.nn.functional.silu(many[:, :1536]) * many[:, 1536:]
    torch.testing.assert_close(library.decode_silu_mul(many), want)
    h, delta, weight = torch.randn(3, 1536) * 50, torch.randn(3, 1536), torch.rand(1536) + 0.5
    added = h + delta
    got = library.decode_add_rms_norm(h, delta, weight, 1e-6)
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(added, (1536,), weight, 1e-6))
    torch.testing.assert_close(h, added)  # the residual is added in place
