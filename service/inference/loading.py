"""Loading a model at a precision, within a small machine's memory.

bfloat16 and float32 go through `from_pretrained`. int8 and int4 are loaded differently, because
their point is a 4 GiB VM: the network is built empty (on the meta device), then the checkpoint is
read one tensor at a time with plain file reads and every Linear is quantized the moment its weights
arrive. At no time does a full bf16 or fp32 copy of the model exist, and nothing stays mapped from
the float checkpoint file, so peak memory is the quantized model plus one layer. A pre-quantized
checkpoint (checkpoint.py) is mapped instead (`map_safetensors`): its stored rows are the weights.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from ..config import DTYPES
from . import attention
from .memory import return_freed_memory
from .quantized import Int8Embedding, Int8Linear, quantize_blocks, quantized_linear

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}


def local_folder(source: str) -> Path:
    """A local model folder as is; a hub id downloaded (or found in the cache) first."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    )


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a .safetensors file, one at a time, read into fresh memory (no mmap: nothing of the
    file stays resident once its tensor is packed and dropped). Straight into uninitialised tensors,
    unbuffered: one copy from the page cache, no zero-fill first."""
    with open(path, "rb", buffering=0) as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            f.seek(base + start)
            data = torch.empty(end - start, dtype=torch.uint8)
            view, done = data.numpy().data, 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{path} ends inside {name}: truncated")
                done += n
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            yield name, data.view(dtype).reshape(info["shape"])


# madvise(MADV_POPULATE_READ), Linux 5.14: map every page of a file mapping now, read-only, in one
# call (Python 3.11's mmap module does not name it). Older kernels refuse it and pages map at first touch.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def map_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a .safetensors file as views of the file mapped into memory, in file order: no
    copy, and no fresh page to fault in per 4 KiB (reading 1.5 GB of int8 weights into new memory
    spent 1.4 s of a 2-core AVX2 EPYC in page faults; mapping it takes a tenth of that). For a
    pre-quantized checkpoint, whose stored int8 rows are the layers' weights as they are: its pages
    are the page cache's, so they cost no second copy and a memory-starved system can drop and
    re-read them. Private and writable (copy on write), so nothing written ever reaches the file;
    the file must not be truncated in place while served (rewriting it makes a new one: os.replace)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mapped.madvise(mmap.MADV_WILLNEED)
    try:
        mapped.madvise(_MADV_POPULATE_READ)
    except OSError:
        pass
    header.pop("__metadata__", None)
    base = 8 + header_len
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.frombuffer of a writable mapping warns
        whole = torch.frombuffer(mapped, dtype=torch.uint8)  # one storage: neighbours can be joined
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        if base + end > size:
            raise ValueError(f"{path} ends inside {name}: truncated")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if end == start:
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        data = whole[base + start : base + end]
        if (base + start) % dtype.itemsize:  # safetensors does not align: a misaligned one is copied
            data = data.clone()
        yield name, data.view(dtype).reshape(info["shape"])


def load_model(source: str, precision: str) -> PreTrainedModel:
    """The model at `precision` (one of `DTYPES`), ready for inference."""
    if precision in ("bfloat16", "float32"):
        from . import checkpoint

        if checkpoint.is_prequantized(Path(source)):  # its float weights are gone: say so, do not guess
            checkpoint.check(Path(source), precision)
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, precision), attn_implementation=attention.NAME
        ).eval()
    if precision not in ("int8", "int4"):
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    return load_quantized(local_folder(source), bits=8 if precision == "int8" else 4)


@dataclass
class Skeleton:
    """The network built empty (on the meta device), and which of its modules get quantized."""

    config: PretrainedConfig
    model: PreTrainedModel
    linears: set[str]  # Linear modules whose weights the checkpoint holds (a tied head excluded)
    embedding_name: str
    head_name: str
    tied: bool  # the output head is the token table (Qwen2.5-1.5B: the checkpoint has no head)


def activation_dtype() -> torch.dtype:
    """What a quantized model computes in between its products: bf16 where the CPU multiplies bf16
    natively (AVX-512 BF16, AMX), else float32. Without those instructions a bf16 product is ten
    times slower than float32 (measured on an AVX2 EPYC) and every layer would convert twice; the
    price is a KV cache twice as large per token (56 KiB instead of 28 for Qwen2.5-1.5B)."""
    return torch.bfloat16 if attention.fast_bf16_products() else torch.float32


def skeleton(folder: Path) -> Skeleton:
    """The model of `folder`'s config.json with no weights yet (in `activation_dtype()`): what
    loading fills in."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=activation_dtype(), attn_implementation=attention.NAME
        )
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    embedding = model.get_input_embeddings()
    embedding_name = next(n for n, m in model.named_modules() if m is embedding)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        linears.discard(head_name)  # tied checkpoints omit the head: it is the embedding matrix
    return Skeleton(config, model, linears, embedding_name, head_name, tied)


def load_quantized(folder: Path, bits: int) -> PreTrainedModel:
    """Linear layers in `bits`-bit weights, the token table in int8 rows, the rest in bf16: from a
    pre-quantized checkpoint (service/inference/checkpoint.py) when `folder` is one, else quantized
    here from the float weights."""
    from . import checkpoint

    if checkpoint.is_prequantized(folder):
        return checkpoint.load(folder, bits)
    s = skeleton(folder)
    config, model, linears, tied = s.config, s.model, s.linears, s.tied
    head_name, embedding_name = s.head_name, s.embedding_name
    embedding = model.get_submodule(embedding_name)
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
                    _replace(model, owner, quantized_linear(bits, parts["weight"], parts.get("bias")))
                    big = tensor.nbytes >= 1 << 24
                    del pending[owner], parts, linear, tensor
                    if big:  # heap-allocated reads (glibc raises its mmap threshold) go back now
                        return_freed_memory()
                continue
            module = model.get_submodule(owner)
            if module is embedding and attr == "weight":
                values, scales = quantize_blocks(tensor)
                _replace(model, embedding_name, Int8Embedding(values, scales, model.dtype))
                if tied:
                    # the head is the same matrix, quantized once for both, in int8 at int4 too:
                    # a token table is not on a 4-bit grid like the layers of a 4-bit model, and
                    # int4 groups of 32 for SmolLM2-135M's tied head alone cost KL 0.05 against
                    # float32 (int4 everywhere else: 0.00004), llama.cpp's Q4 files keep it in 6 bits
                    _replace(model, head_name, Int8Linear(values, scales, None))
                del values, scales, tensor
                return_freed_memory()
                continue
            module._parameters[attr] = torch.nn.Parameter(tensor.to(model.dtype), requires_grad=False)
    return_freed_memory()
    if pending:
        raise ValueError(f"the checkpoint in {folder} is missing weights")
    return finish(model, config, folder, linears - {head_name})


def finish(
    model: PreTrainedModel, config: PretrainedConfig, folder: Path, linears: set[str]
) -> PreTrainedModel:
    """Check that every weight arrived, build the computed buffers, attach the generation config."""
    if any(
        model.get_submodule(n).weight.is_meta
        for n in linears
        if isinstance(model.get_submodule(n), torch.nn.Linear)
    ):
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
