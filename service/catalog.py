"""The catalog: chat models known to work here, with what a user needs to choose between them.

Figures are from each model's card and config: parameter count, context length, licence. Memory is
the weights at a precision plus a fixed allowance for the runtime, tokenizer and a few thousand
tokens of KV cache; what a VM needs on top (OS, Docker) is the deploy's business.

A vision-language model (`vision_params_b` > 0) counts its language part at the precision asked for
and its vision encoder in float32 at int8/int4 (how `inference/vision.py` holds it: see there why),
at the precision itself otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}
RUNTIME_OVERHEAD_GB = 0.6


@dataclass(frozen=True)
class CatalogEntry:
    hub_id: str
    name: str
    params_b: float
    context_length: int
    licence: str
    notes: str
    vision_params_b: float = 0.0  # the vision encoder and connector; 0 = a text-only model

    @property
    def accepts_images(self) -> bool:
        return self.vision_params_b > 0

    def weights_bytes(self, dtype: str = "bfloat16") -> int:
        """The weights at `dtype` (a vision encoder in float32 beside a quantized language part)."""
        vision = BYTES_PER_PARAM[dtype if dtype in ("bfloat16", "float32") else "float32"]
        return int((self.params_b * BYTES_PER_PARAM[dtype] + self.vision_params_b * vision) * 1e9)

    def memory_gb(self, dtype: str = "bfloat16") -> float:
        """Resident memory to expect with the weights held at `dtype`."""
        return round(self.weights_bytes(dtype) / 1e9 + RUNTIME_OVERHEAD_GB, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "accepts_images": self.accepts_images,
            "memory_gb": {d: self.memory_gb(d) for d in BYTES_PER_PARAM},
        }


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "Qwen/Qwen2.5-0.5B-Instruct",
        "Qwen2.5 0.5B Instruct",
        0.49,
        32768,
        "Apache-2.0",
        "ChatML; adds a default system prompt when none is given. Fastest, weakest.",
    ),
    CatalogEntry(
        "Qwen/Qwen2.5-1.5B-Instruct",
        "Qwen2.5 1.5B Instruct",
        1.54,
        32768,
        "Apache-2.0",
        "ChatML; adds a default system prompt when none is given. The default.",
    ),
    CatalogEntry(
        "Qwen/Qwen2.5-3B-Instruct",
        "Qwen2.5 3B Instruct",
        3.09,
        32768,
        "Qwen Research License (non-commercial)",
        "ChatML. Noticeably better answers, about half the speed of 1.5B.",
    ),
    CatalogEntry(
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "TinyLlama 1.1B Chat",
        1.10,
        2048,
        "Apache-2.0",
        "Zephyr template (<|user|> ... </s>); only 2,048 tokens of context.",
    ),
    CatalogEntry(
        "microsoft/Phi-3-mini-4k-instruct",
        "Phi-3 mini 4k Instruct",
        3.82,
        4096,
        "MIT",
        "<|user|> ... <|end|> template; strong at reasoning for its size, 4,096 tokens.",
    ),
    CatalogEntry(
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "SmolLM2 1.7B Instruct",
        1.71,
        8192,
        "Apache-2.0",
        "ChatML; English only.",
    ),
    CatalogEntry(
        "HuggingFaceTB/SmolVLM-500M-Instruct",
        "SmolVLM 500M Instruct (images)",
        0.42,
        8192,
        "Apache-2.0",
        "Reads images (SigLIP encoder + SmolLM2-360M); English. The small vision model: fits a B2s.",
        vision_params_b=0.09,
    ),
    CatalogEntry(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen2.5-VL 7B Instruct (images)",
        7.62,
        32768,
        "Apache-2.0",
        "Reads images, much stronger than SmolVLM; needs a 16 GiB VM at int8, about 1,300 image "
        "tokens per megapixel. Runs on CPU with this Transformers (checked end to end on a tiny "
        "random network of its architecture, not with its weights).",
        vision_params_b=0.67,
    ),
)

_BY_ID = {e.hub_id.lower(): e for e in CATALOG}


def lookup(model: str) -> CatalogEntry | None:
    """The catalog entry for a hub id (any case), or for a local folder named like one."""
    key = model.lower().rstrip("/")
    if key in _BY_ID:
        return _BY_ID[key]
    folder = key.rsplit("/", 1)[-1]
    return next((e for e in CATALOG if e.hub_id.lower().rsplit("/", 1)[-1] == folder), None)


def accepts_images(source: str) -> bool:
    """Whether the model at `source` reads images: its catalog entry says so, or a local folder's
    config.json has a vision part (a folder of one's own, the tests' tiny model)."""
    entry = lookup(source)
    if entry is not None:
        return entry.accepts_images
    config = Path(source).expanduser() / "config.json"
    try:
        return "vision_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False
