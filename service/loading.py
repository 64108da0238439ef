"""Loading a model at a precision, within a small machine's memory.

bfloat16 and float32 go through `from_pretrained`. int8 is loaded differently, because the point of
int8 is a 4 GiB VM: the network is built empty (on the meta device), then the checkpoint is read
one tensor at a time with plain file reads and every Linear is quantized the moment its weights
arrive. At no time does a full bf16 or fp32 copy of the model exist, and nothing stays mapped from
the checkpoint file, so peak memory is the int8 model plus one layer.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from . import attention
from .config import DTYPES
from .engine import return_freed_memory

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

warnings.filterwarnings("ignore", message=".*quantiz.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantize_per_.*", category=UserWarning)


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights (one scale per output channel), computed by PyTorch's dynamically
    quantized kernel (fbgemm: an int8 GEMM, activations quantized on the fly per row). The weights
    are packed for the kernel once, here (`torch.ao`'s own module packs a zero matrix first)."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = values.shape
        bias = None if bias is None else bias.detach().float()
        zero = torch.zeros(values.shape[0], dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(values, scales.double(), zero, 0)
        self._packed = torch.ops.quantized.linear_prepack(weight, bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(*quantize_rows(weight.detach()), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, which keep fbgemm's int16 accumulation from overflowing
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, reduce_range=True).to(x.dtype)


class Int8Embedding(torch.nn.Module):
    """Token embeddings as int8 rows with one scale each: half of bf16's memory for a table that
    is a sixth of a small model (151,936 × 1,536 in Qwen2.5-1.5B). A step looks up a few rows and
    turns only those back into floats."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.values, self.scales, self.dtype = values, scales.float(), dtype
        self.num_embeddings, self.embedding_dim = values.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.values[ids].float() * self.scales[ids].unsqueeze(-1)).to(self.dtype)


def quantize_rows(weight: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row, as (values, scales). A few rows at a time: the
    float32 copy the arithmetic needs is never larger than `chunk` rows (the output head has 152k)."""
    rows = weight.shape[0]
    values = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, chunk):
        w = weight[start:start + chunk].float()
        scale = (w.abs().amax(dim=1) / 127).clamp_(min=1e-8)
        values[start:start + chunk].copy_(w.div_(scale[:, None]).round_().clamp_(-127, 127))
        scales[start:start + chunk] = scale
    return values, scales


def local_folder(source: str) -> Path:
    """A local model folder as is; a hub id downloaded (or found in the cache) first."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                          "*.model", "*.jinja"]))


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a .safetensors file, one at a time, read into fresh memory (no mmap)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            f.seek(base + start)
            buffer = bytearray(end - start)
            f.readinto(buffer)
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            yield name, torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def load_model(source: str, precision: str) -> torch.nn.Module:
    """The model at `precision` ("bfloat16", "float32" or "int8"), ready for inference."""
    if precision in ("bfloat16", "float32"):
        return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, precision),
                                                    attn_implementation=attention.NAME).eval()
    if precision != "int8":
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    return load_int8(local_folder(source))


def load_int8(folder: Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation=attention.NAME)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    embedding = model.get_input_embeddings()
    embedding_name = next(n for n, m in model.named_modules() if m is embedding)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        linears.discard(head_name)  # tied checkpoints omit the head: it is the embedding matrix
    pending: dict[str, dict[str, torch.Tensor]] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    for file in files:
        for name, tensor in read_safetensors(file):
            owner, _, attr = name.rpartition(".")
            owner = _module_name(model, owner)
            if owner in linears:
                parts = pending.setdefault(owner, {})
                parts[attr] = tensor
                linear = model.get_submodule(owner)
                if "weight" in parts and ("bias" in parts or linear.bias is None):
                    _replace(model, owner, Int8Linear.from_float(parts["weight"], parts.get("bias")))
                    big = tensor.nbytes >= 1 << 24
                    del pending[owner], parts, linear, tensor
                    if big:  # heap-allocated reads (glibc raises its mmap threshold) go back now
                        return_freed_memory()
                continue
            module = model.get_submodule(owner)
            if module is embedding and attr == "weight":
                values, scales = quantize_rows(tensor)
                del tensor
                _replace(model, embedding_name, Int8Embedding(values, scales, torch.bfloat16))
                if tied:  # the head is the same matrix: quantized once, packed for the GEMM
                    _replace(model, head_name, Int8Linear(values, scales, None))
                del values, scales
                return_freed_memory()
                continue
            module._parameters[attr] = torch.nn.Parameter(tensor.to(torch.bfloat16), requires_grad=False)
    return_freed_memory()
    linears.discard(head_name)
    if pending or any(model.get_submodule(n).weight.is_meta for n in linears
                      if isinstance(model.get_submodule(n), torch.nn.Linear)):
        raise ValueError(f"the checkpoint in {folder} is missing weights")
    _rebuild_meta_buffers(model, config)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint is missing {missing[:3]}")
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    return model.eval()


def _module_name(model: torch.nn.Module, name: str) -> str:
    """Checkpoint names sometimes lack the wrapper's prefix (e.g. "layers.0" for "model.layers.0")."""
    try:
        model.get_submodule(name)
        return name
    except AttributeError:
        return f"{model.base_model_prefix}.{name}"


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _rebuild_meta_buffers(model: torch.nn.Module, config) -> None:
    """Buffers computed at construction (rotary frequencies) are still empty: build those modules again."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            try:
                fresh = type(module)(config=config)
            except TypeError:
                fresh = type(module)(config)
            _replace(model, name, fresh)
