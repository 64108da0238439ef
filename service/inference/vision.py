"""Vision-language models behind the engine: a prompt with pictures in, tokens out.

A model loaded through `AutoModelForImageTextToText` + `AutoProcessor` (SmolVLM / Idefics3 and
Qwen2.5-VL here) implements the engine's `Backend` protocol, so queueing, cancelling, stop sequences
and streaming are the text path's. What differs:

- The prompt is built by the model's processor, which turns each image into tiles of pixels and
  the run of image tokens they stand for; `prepare` does that and `admit` reads the pixels with the
  prompt (the vision encoder runs once, in prefill). The pixels travel to `admit` inside the
  request's options (`VisionOptions`), so the engine itself needed no change.
- Precision: the language model's Linear layers (and its token table) are quantized exactly as a
  text model's are (`quantized.quantize` via `quantized_linear`, `Int8Embedding`); the vision encoder
  and the connector stay in float32. On an AVX2 CPU without bf16 instructions float32 is the fastest
  float path (bf16 is converted on every product), the encoder is a small share of the weights
  (93M of SmolVLM-500M's 507M), and it runs once per image, compute-bound, where int8's halved
  memory traffic buys little and 7-bit activations would cost accuracy on a ViT's outliers.
- One sequence at a time (`max_batch` 1): a vision prefill is long and compute-bound, and rows with
  pixels do not share a step's cost the way text rows do; other requests wait in the engine's queue.
- Image processors are the PIL/numpy ones (`backend="pil"`): torchvision is never imported.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    DynamicCache,
    PreTrainedModel,
    ProcessorMixin,
)

from ..catalog import accepts_images
from .backend import Sequence, TransformersBackend
from .engine import SamplingOptions
from .quantized import Int8Embedding, quantize_blocks, quantized_linear

log = logging.getLogger(__name__)

# An image's turn in a conversation as the processor's chat template wants it.
IMAGE_PART = {"type": "image"}


@dataclass(frozen=True)
class VisionOptions(SamplingOptions):
    """Sampling options plus the processor's pixel tensors for this prompt (empty without images)."""

    inputs: dict[str, Any] = field(default_factory=dict, compare=False)
    images: int = 0


def is_vision(source: str) -> bool:
    """Whether `source` (hub id or folder) is a model that reads images."""
    return accepts_images(source)


def _language_model(model: PreTrainedModel) -> PreTrainedModel:
    """The language part: Idefics3 names it `text_model`, Qwen2-VL and most others `language_model`."""
    inner = model.get_submodule("model")
    for name in ("text_model", "language_model"):
        if hasattr(inner, name):
            return cast(PreTrainedModel, getattr(inner, name))
    raise ValueError(f"cannot find the language model inside {type(model).__name__}")


def load_vision_model(source: str, precision: str) -> PreTrainedModel:
    """The model at `precision`: int8/int4 quantize the language part and keep the vision encoder
    and connector in float32; bfloat16 and float32 hold everything at that precision."""
    if precision in ("bfloat16", "float32"):
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=getattr(torch, precision))
        return model.eval()
    bits = {"int8": 8, "int4": 4}[precision]
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.bfloat16)
    language = _language_model(model)
    head = model.get_output_embeddings()
    embedding = language.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    for name, module in list(language.named_modules()):
        if isinstance(module, torch.nn.Linear):
            _replace(language, name, quantized_linear(bits, module.weight.data, module.bias))
    values, scales = quantize_blocks(cast(torch.Tensor, embedding.weight).detach())
    language.set_input_embeddings(Int8Embedding(values, scales, torch.float32))
    if head is not None:
        model.set_output_embeddings(quantized_linear(bits, head.weight.data, None))
    del head, embedding
    log.info("quantized the language model of %s to %s (tied head: %s)", source, precision, tied)
    return model.float().eval()  # the vision encoder, connector and norms; quantized layers keep theirs


def _replace(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def images_only_processor(processor_class: type) -> type:
    """`processor_class` without its video processor. Qwen2-VL's processors take one, and in
    Transformers 5 every video processor needs torchvision (which cannot be installed beside this
    torch); images need only the PIL image processor and the tokenizer."""

    class ImagesOnly(processor_class):
        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any
        ):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImagesOnly.__name__ = processor_class.__name__
    return ImagesOnly


def load_processor(source: str) -> Any:
    """The model's processor with the PIL image processor (`backend="pil"`); for a Qwen2-VL family
    model, built from its image processor and tokenizer without the video part."""
    config = AutoConfig.from_pretrained(source)
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor

        cls = Qwen2_5_VLProcessor if config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
        tokenizer = AutoTokenizer.from_pretrained(source)
        images = AutoImageProcessor.from_pretrained(source, backend="pil")
        template = getattr(tokenizer, "chat_template", None)
        for name in ("chat_template.jinja", "chat_template.json"):
            path = Path(source) / name
            if path.is_file():
                text = path.read_text()
                template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        return images_only_processor(cls)(image_processor=images, tokenizer=tokenizer, chat_template=template)
    return AutoProcessor.from_pretrained(source, backend="pil")


class VisionBackend(TransformersBackend):
    """A vision-language model on CPU, one sequence at a time, with the text backend's sampling."""

    accepts_images = True
    # a prompt's images enter the model with its text, in one forward pass (`admit`), never in pieces
    prompt_in_pieces = False

    def __init__(
        self,
        model_id: str,
        *,
        dtype: str = "int8",
        threads: int = 0,
        context_tokens: int = 4096,
        max_pixels: int = 1_048_576,
    ):
        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.name = model_id
        self.max_batch = 1
        self.max_pixels = max_pixels
        self.processor = load_processor(model_id)
        self.tokenizer = self.processor.tokenizer
        self.model = load_vision_model(model_id, dtype)
        config = AutoConfig.from_pretrained(model_id)
        text_config = getattr(config, "text_config", config)
        config_ctx = getattr(text_config, "max_position_embeddings", None) or context_tokens
        self.context_length = min(context_tokens, config_ctx)
        self.generation_config = self.model.generation_config
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        self._seq: Sequence | None = None
        self._cache: DynamicCache | None = None
        log.info("loaded %s (%s, vision) in %.1f s", model_id, dtype, time.perf_counter() - started)

    # --- the prompt ------------------------------------------------------------------------------
    def prepare(self, messages: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        """Token ids and pixel tensors for `messages` (dicts with role, content and optional
        "images": PIL images), through the model's own chat template and processor."""
        conversation, images = [], []
        for m in messages:
            pictures = list(m.get("images") or ())
            parts: list[dict[str, Any]] = [IMAGE_PART for _ in pictures]
            parts.append({"type": "text", "text": m["content"]})
            conversation.append({"role": m["role"], "content": parts})
            images.extend(pictures)
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if not images:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return list(ids), {}
        out = self.processor(text=[text], images=[images], return_tensors="pt", **self._image_kwargs(images))
        ids = out.pop("input_ids")[0].tolist()
        out.pop("attention_mask", None)
        return ids, dict(out)

    def _image_kwargs(self, images: list[Any]) -> dict[str, Any]:
        """Keep the processor from scaling an image up beyond what IMAGE_MAX_PIXELS allowed: Idefics3
        resizes every image to its `size` (SmolVLM: 2,048 px) before cutting 512 px tiles; Qwen2-VL
        takes a pixel budget."""
        kind = type(self.processor.image_processor).__name__
        if kind.startswith(("Idefics3", "SmolVLM")):
            tile = self.processor.image_processor.max_image_size["longest_edge"]
            longest = max(max(i.size) for i in images)
            edge = max(tile, -(-longest // tile) * tile)
            configured = self.processor.image_processor.size["longest_edge"]
            return {"images_kwargs": {"size": {"longest_edge": min(edge, configured)}}}
        if kind.startswith("Qwen2VL"):
            size = self.processor.image_processor.size
            budget = min(self.max_pixels, size["longest_edge"])
            return {
                "images_kwargs": {"size": {"shortest_edge": size["shortest_edge"], "longest_edge": budget}}
            }
        return {}

    # --- the engine's interface ------------------------------------------------------------------
    def admit(self, prompt_ids: list[int], options: SamplingOptions) -> tuple[Sequence, int]:
        """Read the prompt and its pixels in one forward pass and return the first token."""
        if self._seq is not None:
            raise RuntimeError("a vision backend holds one sequence at a time")
        inputs = options.inputs if isinstance(options, VisionOptions) else {}
        seq = Sequence(list(prompt_ids), options)
        self._setup_sampling(seq)
        self._forget_positions()
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([seq.prompt_ids]),
                attention_mask=torch.ones(1, len(seq.prompt_ids), dtype=torch.long),
                use_cache=True,
                logits_to_keep=1,
                **inputs,
            )
        seq.length = len(seq.prompt_ids)
        token = self._sample(seq, out.logits[0, -1])
        self._seq, self._cache = seq, out.cache
        return seq, token

    def step(self) -> list[int]:
        seq, cache = self._seq, self._cache
        if seq is None or cache is None:
            raise RuntimeError("no sequence is in the batch")
        # No attention mask: one unpadded row needs none, and with one Qwen2-VL's decode positions
        # are the mask's running count, one per token of the whole sequence, where a step holds one
        # token (its attention then yields the sequence's length of rows: the o_proj shape error).
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[seq.generated[-1]]]), cache=cache, use_cache=True)
        self._cache = out.cache
        seq.length += 1
        return [self._sample(seq, out.logits[0, -1])]

    def _forget_positions(self) -> None:
        """Qwen2-VL keeps the offset of its 3-D (time, height, width) rotary positions from the last
        prompt with images on the model (`rope_deltas`) and reuses it while decoding; a text-only
        prompt computes none, so the previous picture's offset would shift its positions."""
        inner = self.model.get_submodule("model")
        if hasattr(inner, "rope_deltas"):
            setattr(inner, "rope_deltas", None)  # noqa: B010 (a plain attribute, not a submodule)

    def release(self, sequence: Any) -> None:
        if sequence is self._seq:
            self._seq, self._cache = None, None

    def reset(self) -> None:
        self._seq, self._cache = None, None

    @property
    def batch_size(self) -> int:
        return 0 if self._seq is None else 1
