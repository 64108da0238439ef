"""Pre-quantized checkpoints: a model folder whose weights are already int8 or int4.

Quantizing at load reads the float weights (3 GB for Qwen2.5-1.5B in bf16) and rounds every matrix,
which takes most of a minute on a small VM. A pre-quantized folder is written once, from the float
model, and then loads in seconds: its weights file holds `quantized.quantize()`'s stored form
(kernel-independent: each kernel packs its own layout from it at load, cheaply), and the folder
holds the tokenizer and config files too, so it is a complete `MODEL_ID`. The image bakes one in
place of the bf16 file: half the bytes to pull, and no float copy of the model ever exists.

    python -m service.inference.checkpoint SOURCE DEST [--precision int8|int4] [--model-id ID]

`quantized.json` beside the weights says what they are: a format version, the precision, where they
came from (model id, sha256 of config.json and of every source weight file) and the torch and
Transformers versions that wrote them. The loader refuses a folder that does not match what it was
asked for, saying what differs: an unknown format version, another precision (DTYPE=int8 given an
int4 folder names int4; DTYPE=bfloat16 cannot be served from either), a config.json changed since,
or a weights file of another length (truncated). The weights' own sha256 is recorded but not
checked at load: hashing 1.5 GB would cost more than the whole load; the length and the header are
checked instead.

The weights file is a plain safetensors file: each module's tensors are stored together, named
``<module>.<key>`` (``model.layers.0.mlp.up_proj.values``, ``….scales``, ``….bias``); the token
table as int8 rows (``model.embed_tokens.values`` / ``.scales``); a head tied to the table is not
stored (it is the table, at int4 too: see `loading.load_quantized`); norms stay bf16. Format version
1 folders stored an int4 form of a tied head at int4, which still loads as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .loading import (
    SAFETENSORS_DTYPES,
    Skeleton,
    _module_name,
    _replace,
    finish,
    local_folder,
    map_safetensors,
    read_safetensors,
    skeleton,
)
from .memory import return_freed_memory
from .quantized import FUSED, Int8Embedding, from_quantized, quantize, quantize_blocks

FORMAT = "qwen-box-quantized"
# Bump when the stored form changes (quantize()'s keys or meaning, the naming above): a folder
# written by a version not in READABLE is refused rather than misread. Version 2: int8 scales per
# row and block of 32 inputs (float16); version 1's one float32 scale per row still loads (each
# row's scale repeated over its blocks, `quantized.block_scales`: the same weights).
FORMAT_VERSION = 2
READABLE = (1, 2)
MANIFEST = "quantized.json"
PRECISIONS = {"int8": 8, "int4": 4}
# What a model folder holds besides its weights: config, tokenizer, chat template, generation config.
COMPANION_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja")
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_CHUNK = 16 << 20
# Loading hands freed memory back to the system after this many bytes of stored tensors: often enough
# that the peak stays the model plus a few matrices, rarely enough that trimming costs little.
TRIM_EVERY = 64 << 20


class CheckpointMismatch(ValueError):
    """A pre-quantized folder that is not what it was asked to be: the message says what differs."""


def is_prequantized(folder: Path) -> bool:
    """Whether `folder` is a pre-quantized checkpoint (has the manifest this module writes)."""
    return (folder / MANIFEST).is_file()


def weights_file(precision: str) -> str:
    return f"model.{precision}.safetensors"


# --- writing -----------------------------------------------------------------------------------------


def write(
    source: str,
    dest: Path,
    precision: str = "int8",
    *,
    model_id: str = "",
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Write the pre-quantized checkpoint of `source` (a model folder or hub id) into `dest` and return
    its manifest. One source tensor at a time: peak memory is the largest matrix (the token table),
    not the model."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bits = PRECISIONS[precision]
    folder = local_folder(source)
    if is_prequantized(folder):
        raise CheckpointMismatch(f"{folder} is already pre-quantized; write from the original model")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    dest.mkdir(parents=True, exist_ok=True)
    s = skeleton(folder)
    name = weights_file(precision)
    part = dest / f"{name}.part"
    entries: dict[str, dict] = {}
    started = time.monotonic()
    with part.open("wb") as data:

        def put(tensor_name: str, tensor: torch.Tensor) -> None:
            tensor = tensor.detach().contiguous()
            start = data.tell()
            data.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            entries[tensor_name] = {
                "dtype": _DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [start, data.tell()],
            }

        for file in files:
            _write_file(s, file, bits, put)
            progress(f"quantized {file.name} ({time.monotonic() - started:.0f} s)")
    missing = s.linears - {n.rpartition(".")[0] for n in entries}
    if missing:
        part.unlink()
        raise ValueError(f"the checkpoint in {folder} is missing weights of {sorted(missing)[:3]}")
    weights_sha = _assemble(dest / name, part, entries, precision)
    for pattern in COMPANION_PATTERNS:
        for companion in folder.glob(pattern):
            if companion.name != MANIFEST and not companion.name.endswith(".safetensors.index.json"):
                shutil.copyfile(companion, dest / companion.name)
    import transformers

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "precision": precision,
        "weights": {"file": name, "bytes": (dest / name).stat().st_size, "sha256": weights_sha},
        "config_sha256": _sha256(folder / "config.json"),
        "tied_head": s.tied,
        "source": {
            "model": model_id or source,
            "files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
        },
        "written_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"wrote {dest} ({precision}, {manifest['weights']['bytes'] / 1e9:.2f} GB)")
    return manifest


def _write_file(s: Skeleton, file: Path, bits: int, put: Callable[[str, torch.Tensor], None]) -> None:
    """Every tensor of one source file in its stored form; each module's tensors written together."""
    model = s.model
    embedding = model.get_submodule(s.embedding_name)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    held: dict[tuple[str, tuple[str, ...]], dict[str, dict[str, torch.Tensor]]] = {}
    for name, tensor in read_safetensors(file):
        owner, _, attr = name.rpartition(".")
        owner = _module_name(model, owner)
        if owner in s.linears:
            parts = pending.setdefault(owner, {})
            parts[attr] = tensor
            if "weight" in parts and ("bias" in parts or model.get_submodule(owner).bias is None):
                stored = quantize(bits, parts["weight"])
                if "bias" in parts:
                    stored["bias"] = parts["bias"].to(torch.bfloat16)
                del pending[owner], parts
                parent, _, leaf = owner.rpartition(".")
                group = next((g for g in FUSED if leaf in g), None)
                if group is None:
                    _put_layers([(owner, stored)], put)
                else:
                    members = held.setdefault((parent, group), {})
                    members[leaf] = stored
                    present = [m for m in group if f"{parent}.{m}" in s.linears]
                    if all(m in members for m in present):
                        del held[parent, group]
                        _put_layers([(f"{parent}.{m}", members[m]) for m in present], put)
        elif model.get_submodule(owner) is embedding and attr == "weight":
            values, scales = quantize_blocks(tensor)
            put(f"{owner}.values", values)
            put(f"{owner}.scales", scales)
            del values, scales  # a tied head is the table itself, at int8 and at int4 alike
        else:
            put(f"{owner}.{attr}", tensor.to(torch.bfloat16))
        del tensor
        return_freed_memory()
    if pending:  # a weight whose bias is in another shard: rare, and then it is written here
        raise ValueError(f"{file} holds a part of {sorted(pending)[:3]} without the rest")
    for (parent, names), members in held.items():  # a group split across shards: stored apart
        _put_layers([(f"{parent}.{m}", members[m]) for m in names if m in members], put)


def _put_layers(
    layers: list[tuple[str, dict[str, torch.Tensor]]], put: Callable[[str, torch.Tensor], None]
) -> None:
    """Quantized layers' tensors: first each layer's weight rows (its largest tensor), one layer's right
    after the other's, then the rest. A group the decode step fuses into one product (`quantized.FUSED`)
    is so one run of rows in the file, which loading maps and fuses without a copy."""
    weights = [max(stored, key=lambda key: stored[key].nbytes) for _, stored in layers]
    for (owner, stored), key in zip(layers, weights, strict=True):
        put(f"{owner}.{key}", stored[key])
    for (owner, stored), weight in zip(layers, weights, strict=True):
        for key, value in stored.items():
            if key != weight:
                put(f"{owner}.{key}", value)


def _assemble(path: Path, part: Path, entries: dict[str, dict], precision: str) -> str:
    """The safetensors file: 8-byte header length, JSON header (padded to 8), then the data written
    before; returns the file's sha256."""
    header = {
        "__metadata__": {"format": FORMAT, "format_version": str(FORMAT_VERSION), "precision": precision},
        **entries,
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out, part.open("rb") as data:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            out.write(chunk)
            digest.update(chunk)
        while chunk := data.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
    part.unlink()
    os.replace(tmp, path)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- checking and loading ----------------------------------------------------------------------------


def check(folder: Path, precision: str) -> dict:
    """The manifest of the pre-quantized `folder`, if it is what loading it at `precision` needs;
    otherwise `CheckpointMismatch` naming what differs and what to do."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointMismatch(f"{folder / MANIFEST} cannot be read: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointMismatch(f"{folder / MANIFEST} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version not in READABLE:
        raise CheckpointMismatch(
            f"{folder} is a pre-quantized checkpoint of format version {version}; this qwen-box reads "
            f"version {FORMAT_VERSION}: write it again from the original model "
            f"(python -m service.inference.checkpoint SOURCE {folder} "
            f"--precision {manifest.get('precision')})"
        )
    stored = manifest.get("precision")
    if stored != precision:
        if precision in PRECISIONS:
            fix = f"set DTYPE={stored}, or point MODEL_ID at the original model (quantized at load)"
        else:
            fix = f"its float weights are not in it: set DTYPE={stored}, or point MODEL_ID at the float model"
        raise CheckpointMismatch(
            f"{folder} holds weights pre-quantized to {stored}, "
            f"but DTYPE={precision} asks for {precision}: {fix}"
        )
    config = folder / "config.json"
    have = _sha256(config) if config.is_file() else "missing"
    if have != manifest.get("config_sha256"):
        raise CheckpointMismatch(
            f"{config} is not the config these weights were quantized with (sha256 {have[:12]}, "
            f"manifest {str(manifest.get('config_sha256'))[:12]}): restore it, or write the checkpoint again"
        )
    weights = folder / manifest["weights"]["file"]
    size = weights.stat().st_size if weights.is_file() else 0
    if size != manifest["weights"]["bytes"]:
        raise CheckpointMismatch(
            f"{weights} is {size:,} bytes, its manifest says {manifest['weights']['bytes']:,}: "
            "truncated or replaced; write the checkpoint again"
        )
    with weights.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(length)) if length < size else {}
        except ValueError:
            header = {}
    meta = header.pop("__metadata__", {})
    end = max((t["data_offsets"][1] for t in header.values()), default=-1)
    if meta.get("precision") != stored or 8 + length + end != size:
        raise CheckpointMismatch(f"{weights} does not hold what its manifest describes: write it again")
    return manifest


def load(folder: Path, bits: int) -> PreTrainedModel:
    """The model from pre-quantized `folder`: the weights file mapped into memory (`map_safetensors`),
    each module's stored tensors handed to `from_quantized`, which keeps them as they are (the int8
    and int4 kernels read the stored form; only the fallback kernels pack a copy), so loading
    copies nothing big and peak memory is the model plus one matrix; nothing is quantized again."""
    precision = next(p for p, b in PRECISIONS.items() if b == bits)
    manifest = check(folder, precision)
    s = skeleton(folder)
    model = s.model
    table: dict[str, torch.Tensor] = {}

    def build(owner: str, parts: dict[str, torch.Tensor]) -> None:
        if owner == s.embedding_name:
            table.update(parts)
            _replace(model, owner, Int8Embedding(parts["values"], parts["scales"], model.dtype))
        elif owner in s.linears or owner == s.head_name:
            bias = parts.pop("bias", None)
            _replace(model, owner, from_quantized(parts, bias))
        else:
            module = model.get_submodule(owner)
            for key, tensor in parts.items():
                module._parameters[key] = torch.nn.Parameter(tensor.to(model.dtype), requires_grad=False)

    owners: dict[str, dict[str, torch.Tensor]] = {}  # views of the mapped file: no memory of their own
    for name, tensor in map_safetensors(folder / manifest["weights"]["file"]):
        module, _, key = name.rpartition(".")
        owners.setdefault(module, {})[key] = tensor
    unreturned = 0
    for owner in list(owners):
        parts = owners.pop(owner)
        unreturned += sum(t.nbytes for t in parts.values())
        build(owner, parts)
        del parts
        if unreturned >= TRIM_EVERY:  # what packing freed goes back (glibc keeps small frees)
            return_freed_memory()
            unreturned = 0
    if s.tied and isinstance(model.get_submodule(s.head_name), torch.nn.Linear):
        _replace(
            model, s.head_name, from_quantized({"values": table["values"], "scales": table["scales"]}, None)
        )
    table.clear()
    return_freed_memory()
    if isinstance(model.get_submodule(s.head_name), torch.nn.Linear):
        raise CheckpointMismatch(f"{folder} has no weights for the output head")
    return finish(model, s.config, folder, s.linears)


# --- command line ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.inference.checkpoint",
        description="Write a pre-quantized checkpoint (a complete model folder) from a float model.",
    )
    parser.add_argument("source", help="model folder or hub id of the float (bf16/fp32) weights")
    parser.add_argument("dest", type=Path, help="folder to write (MODEL_ID then points here)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="int8", help="default int8")
    parser.add_argument("--model-id", default="", help="model id to record as the source (default: SOURCE)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        write(args.source, args.dest, args.precision, model_id=args.model_id, progress=print)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"done in {time.monotonic() - started:.0f} s; "
        f"serve it with MODEL_ID={args.dest} DTYPE={args.precision}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
