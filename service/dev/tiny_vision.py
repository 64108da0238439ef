"""Random vision-language models of SmolVLM's (Idefics3) and Qwen2.5-VL's architectures, for tests
and the benchmark.

Built like `tiny_models`: a real byte-level BPE tokenizer (with the model's image tokens added), the
model's processor with its PIL image processor and its own chat template, and a randomly
initialised network, saved with ``save_pretrained`` so that ``MODEL_ID`` can point at the folder.
``build_tiny_vision(path)`` (SmolVLM) and ``build_tiny_qwen_vl(path)`` (Qwen2.5-VL) make one in
about a second; ``SMOLVLM_500M`` gives the real model's dimensions
(HuggingFaceTB/SmolVLM-500M-Instruct's config.json), which the benchmark uses to time the exact
architecture without downloading its weights.

A tiny Qwen2.5-VL must keep three sizes in agreement that the real config satisfies without
saying so: the text attention's head_dim (hidden_size / num_attention_heads) is twice the sum of
``rope_parameters["mrope_section"]`` (the real [16, 24, 24] for head_dim 128: left at its default
with a small head_dim, the rotary split fails), the vision tower's ``out_hidden_size`` is the text
``hidden_size`` (the merger's output replaces image-token embeddings), and the image processor's
patch_size / merge_size / temporal_patch_size are the vision config's.
"""

from __future__ import annotations

import json
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


# Qwen2-VL's chat template (Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json), pictures before text.
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The tiny Qwen2.5-VL: head_dim 16 = 2 x (2 + 3 + 3); 14-pixel patches merged 2 x 2 as in the real one.
TINY_QWEN_VL: dict[str, Any] = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
    },
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1],
        "window_size": 112,
    },
    "min_pixels": 56 * 56,
    "max_pixels": 1_048_576,
}
# Qwen/Qwen2.5-VL-7B-Instruct's config.json: Qwen2.5-7B (28 layers of 3584, 28 heads, 4 KV heads,
# head_dim 128) and a 32-block ViT of 1280 (window attention, full attention every 8th block).
QWEN25_VL_7B: dict[str, Any] = {
    "text": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        "vocab_size": 152064,
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "window_size": 112,
    },
    "min_pixels": 3136,
    "max_pixels": 12_845_056,
    "tie_word_embeddings": False,
}


def build_tiny_qwen_vl(
    path: Path, *, dims: dict[str, Any] = TINY_QWEN_VL, seed: int = 0, endless: bool = False
) -> Path:
    """Write a random Qwen2.5-VL model with its tokenizer, image processor and chat template to `path`
    and return it. ``endless`` as above."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *QWEN_VL_TOKENS]})
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)  # the real folder has chat_template.json
    images = Qwen2VLImageProcessorPil()
    # the files as Qwen/Qwen2.5-VL-7B-Instruct ships them (older than processor_config.json), so the
    # loader reads the real model's layout
    preprocessor = {
        "min_pixels": dims["min_pixels"],
        "max_pixels": dims["max_pixels"],
        "patch_size": images.patch_size,
        "temporal_patch_size": images.temporal_patch_size,
        "merge_size": images.merge_size,
        "image_mean": list(images.image_mean),
        "image_std": list(images.image_std),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_TEMPLATE}))
    image, video, start, stop, end, pad = tokenizer.convert_tokens_to_ids(
        [*QWEN_VL_TOKENS[2:], *QWEN_VL_TOKENS[:2], "<|im_end|>", "<|endoftext|>"]
    )
    tied = dims.get("tie_word_embeddings", True)
    text = {"vocab_size": len(tokenizer), **dims["text"]}
    config = Qwen2_5_VLConfig(
        text_config={
            "max_position_embeddings": 32768,
            "bos_token_id": pad,
            "eos_token_id": end,
            "pad_token_id": pad,
            "tie_word_embeddings": tied,
            **text,
        },
        vision_config={
            "patch_size": images.patch_size,
            "spatial_merge_size": images.merge_size,
            "temporal_patch_size": images.temporal_patch_size,
            **dims["vision"],
        },
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=stop,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(
        eos_token_id=[end, pad],
        pad_token_id=pad,
        do_sample=False,
        suppress_tokens=[end, pad] if endless else None,
    )
    model.save_pretrained(path)
    return path
