"""Random vision-language models of SmolVLM's architecture (Idefics3), for tests and the benchmark.

Built like `tiny_models`: a real byte-level BPE tokenizer (with SmolVLM's image tokens added), the
Idefics3 processor with its PIL image processor and SmolVLM's chat template, and a randomly
initialised network, saved with ``save_pretrained`` so that ``MODEL_ID`` can point at the folder.
``build_tiny_vision(path)`` makes one in about a second; ``SMOLVLM_500M`` gives the real model's
dimensions (HuggingFaceTB/SmolVLM-500M-Instruct's config.json), which the benchmark uses to time
the exact architecture without downloading its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tiny_models import build_tokenizer

# SmolVLM's own chat template (its processor's chat_template.json).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]

# The tiny test model: 32-pixel tiles of 8-pixel patches, 4 image tokens per tile, images resized to
# at most 128 pixels (16 tiles + the global one).
TINY: dict[str, Any] = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "scale_factor": 2,
    "tile": 32,
    "longest_edge": 128,
}
# HuggingFaceTB/SmolVLM-500M-Instruct: SmolLM2-360M (32 layers of 960, 15 heads, 5 KV heads) and a
# SigLIP base encoder (12 layers of 768, 16-pixel patches of 512-pixel tiles), 64 tokens per tile.
SMOLVLM_500M: dict[str, Any] = {
    "text": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "rope_theta": 100000.0,
        "vocab_size": 49280,
    },
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "scale_factor": 4,
    "tile": 512,
    "longest_edge": 2048,
    "tie_word_embeddings": False,  # its own output head: 507M parameters in all
}


def build_tiny_vision(
    path: Path, *, dims: dict[str, Any] = TINY, seed: int = 0, endless: bool = False
) -> Path:
    """Write a random Idefics3 (SmolVLM) model with its processor to `path` and return it.
    ``endless`` suppresses the end-of-turn tokens, so a reply always runs to max_tokens."""
    import torch
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(path)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    vision = dims["vision"]
    image_seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // dims["scale_factor"] ** 2
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": dims["longest_edge"]}, max_image_size={"longest_edge": dims["tile"]}
    )
    processor = Idefics3Processor(
        images, tokenizer, image_seq_len=image_seq_len, chat_template=SMOLVLM_TEMPLATE
    )
    processor.save_pretrained(path)
    end, pad = tokenizer.convert_tokens_to_ids(["<end_of_utterance>", "<|endoftext|>"])
    text = {"vocab_size": len(tokenizer), **dims["text"]}
    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "max_position_embeddings": 8192,
            "tie_word_embeddings": dims.get("tie_word_embeddings", True),
            "pad_token_id": pad,
            "eos_token_id": end,
            **text,
        },
        vision_config=vision,
        scale_factor=dims["scale_factor"],
        image_token_id=processor.image_token_id,
        tie_word_embeddings=dims.get("tie_word_embeddings", True),
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(
        eos_token_id=[end],
        pad_token_id=pad,
        do_sample=False,
        suppress_tokens=[end] if endless else None,
    )
    model.save_pretrained(path)
    return path
