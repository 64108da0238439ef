"""Small random chat models that load through the same path as real weights, for tests and benchmarks.

Where the Hugging Face Hub is out of reach (tests, CI), these make a model on the spot: a real
byte-level BPE tokenizer trained on a few paragraphs, ChatML special tokens and chat template (as
Qwen2.5 ships them), and a randomly initialised Qwen2 network. Saved with ``save_pretrained`` it is
a folder that ``MODEL_ID`` can point at, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# TinyLlama's (Zephyr's) template: a second architecture with a template of its own.
ZEPHYR_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

_CORPUS = """
Docker packages an application and everything it needs into one image that runs the same everywhere.
A container is a running image. Flask is a small web framework for Python; gunicorn serves it.
The quick brown fox jumps over the lazy dog. Large language models predict the next token of text.
Tokens are pieces of words: byte-level BPE merges frequent byte pairs into a vocabulary.
Azure virtual machines run Linux images; cloud-init configures them on first boot.
def hello(name):\n    return f"Hello, {name}!"\n
<html> <script> alert(1) </script> <img src=x onerror=alert(1)> & " ' < > { } [ ] ( ) ; : , .
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and accents: café, naïve, 日本語, emoji 🙂.
"""


def build_tokenizer(path: Path, vocab_size: int = 1024, *, style: str = "chatml"):
    """Train a byte-level BPE tokenizer with the chat tokens of `style` ("chatml" or "zephyr")
    and save it in Transformers' format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS if style == "chatml" else LLAMA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    if style == "chatml":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>"],
        )
        fast.chat_template = CHATML_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="</s>",
            additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        )
        fast.chat_template = ZEPHYR_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_model(
    path: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    max_positions: int = 4096,
    seed: int = 0,
    eos_token_ids: list[int] | None = None,
    endless: bool = False,
) -> Path:
    """Write a random Qwen2 chat model to ``path`` and return it.

    ``eos_token_ids`` replaces the end-of-turn ids in ``generation_config.json`` (tests use it to make
    the model stop on a token it is known to produce). ``endless`` adds the end-of-turn ids to the
    config's ``suppress_tokens``, so the model always runs to ``max_tokens``: the tests that need a
    long generation can count on one.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(path)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=endoftext,
        eos_token_id=im_end,
    )
    torch.manual_seed(seed)
    # transformers declares PreTrainedModel.to with @wraps(torch.nn.Module.to), which types it unbound
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    # Qwen2.5-Instruct's own sampling defaults, so the engine's "honour generation_config" is exercised.
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=eos_token_ids or [im_end, endoftext],
        pad_token_id=endoftext,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
        suppress_tokens=[im_end, endoftext] if endless else None,
    )
    model.save_pretrained(path)
    return path


def build_tiny_llama(path: Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 1) -> Path:
    """Write a random Llama chat model with a Zephyr template (like TinyLlama-Chat) to `path`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(path, style="zephyr")
    bos, eos = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]  # as above
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, do_sample=False
    )
    model.save_pretrained(path)
    return path
