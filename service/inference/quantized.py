"""Quantized layers: weights in fewer bits, for a CPU whose decode speed is its memory bandwidth.

Generating a token reads every weight once, so bytes per weight set the pace: bf16 reads 2, int8
1, int4 half a byte. The layers keep the weights in `quantize`'s stored form (what a pre-quantized
checkpoint holds), so loading packs nothing, and compute with the kernels chosen once for this CPU
(`kernel_plan`, logged at the first layer):

- decode (a few activation rows): the compiled kernels of `kernels.py` (AVX2 + FMA, int8 rows and
  int4 groups read as stored, multiplied in integers), near memory speed;
- a prompt (more rows): int8 through the compiled prompt kernel (`int8_prompt_matmul`: the same
  numbers as the decode kernel, weight rows packed per call into panels of 16 whose lanes are
  output rows, compute-bound); int4 prompts through the int4 decode kernel (8x faster than float32
  products of dequantized rows on an AVX2 EPYC; an int4 prompt kernel of its own read a 256-token
  prompt slower inside the model in two sessions' interleaved A/B, 4.93 s against 3.84);
- without the compiled kernels (no compiler, no AVX2): float32 products of dequantized int8 rows,
  PyTorch's weight-only int4 kernel (`_weight_int4pack_mm_for_cpu`) on bf16 rows: supported, slower.

Every int8 product quantizes its activations per row and block of 32 inputs (symmetric int8,
scale = max|x_block| / 127), times weights with a scale per row and block of 32: llama.cpp's
Q8_0 x Q8_0. On SmolLM2-135M's real weights this is as close to float32 as llama.cpp's Q8_0
(teacher-forced KL 0.004), where one activation scale per row was ten times further (0.037) and
oneDNN's one scale per prompt (its int8 GEMM, the former prompt path on VNNI CPUs) 300 times (1.3).

- `Int8Linear`: a float16 scale per output row and block of 32 inputs.
- `Int4Linear`: 4-bit weights with a scale and low per group of 32 inputs.
- `Int8Embedding`: the token table as int8 rows, in the Linear's form; a step looks up a few rows.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from . import kernels

log = logging.getLogger(__name__)

# int4 weights: a scale and low per group of 32 inputs (the activations they multiply are quantized
# per block of 32 too). On SmolLM2-135M, whose weights sit on a Q4_1 grid of 32, groups of 128 with
# per-row activations were 1.78x float32's perplexity (KL 0.60); groups of 32 with per-32 activations
# see docs/performance.md. Checkpoints of groups of 64 or 128 (format version 1) still load: each
# group's scale and low repeated over its 32s (the same weights).
INT4_GROUP = 32
# Layers the decode step (decoder.py) fuses into one product, by their names under a decoder layer's
# attention and MLP, in output order. The checkpoint writer stores each group's weight rows one after
# another, so that fusing them at load is a view of the mapped file, not a copy (decoder._joined).
FUSED: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
DECODE_ROWS = 8  # activation rows up to which a product is a decode step (bandwidth-bound)
BLOCK = 32  # int8 weights and the activations they multiply: one scale per row and block of 32 inputs


@functools.cache
def kernel_plan() -> dict[str, str]:
    """Which kernel computes what on this CPU, decided once (and logged once)."""
    plan = choose_kernels(compiled=kernels.available())
    log.info("quantized kernels: %s", ", ".join(f"{k}: {v}" for k, v in plan.items()))
    return plan


def choose_kernels(*, compiled: bool) -> dict[str, str]:
    """The kernel for each kind of product, given what this machine has: the compiled kernels for
    decode and prompts on every CPU with AVX2 (the products quantize activations per row and block of
    32 inputs, Q8_0 x Q8_0); without them, float32 products of dequantized rows for int8 (weights
    only quantized) and PyTorch's int4 kernel on bf16 rows. oneDNN's int8 GEMM, once the prompt path
    on CPUs with VNNI, took one activation scale for the whole prompt: 3.4x float32's perplexity on
    SmolLM2-135M, so no path uses it."""
    dequantized = "float32 mm of dequantized rows"
    return {
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "int8 decode": "qwenbox" if compiled else dequantized,
        "int8 prompt": "qwenbox" if compiled else dequantized,
        "int4 decode": "qwenbox" if compiled else "aten._weight_int4pack_mm_for_cpu (bf16)",
        "int4 prompt": "qwenbox" if compiled else "aten._weight_int4pack_mm_for_cpu (bf16)",
    }


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights and a float16 scale per output row and block of 32 inputs
    (w ≈ values × scale, llama.cpp's Q8_0). Per-row scales (the stored form of format version 1) are
    taken too: they become the same scale in every block of the row."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.values = values.contiguous()
        self.scales = block_scales(scales, self.in_features)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.plan = kernel_plan()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(*quantize_blocks(weight.detach()), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()
        decode = rows.shape[0] <= DECODE_ROWS
        if self.plan["int8 decode" if decode else "int8 prompt"] == "qwenbox":
            library = kernels.library()
            assert library is not None
            kernel = library.int8_matmul if decode else library.int8_prompt_matmul
            out = kernel(rows, self.values, self.scales, self.bias)
        else:
            out = self._dequantized(rows)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        """Without the compiled kernels: float32 products of dequantized rows, 2,048 at a time
        (never a float copy of the whole matrix)."""
        out = torch.empty(rows.shape[0], self.out_features)
        for start in range(0, self.out_features, 2048):
            w = dequantize_int8(self.values[start : start + 2048], self.scales[start : start + 2048])
            torch.matmul(rows, w.T, out=out[:, start : start + 2048])
        return out if self.bias is None else out.add_(self.bias)


def block_scales(scales: torch.Tensor, inputs: int) -> torch.Tensor:
    """int8 weight scales in the stored form, float16 (rows, ceil(inputs / 32)); one scale per row
    (float32 (rows,), format version 1) repeated over the row's blocks (rounded to float16: within
    2^-11 of the scale, a sixteenth of the int8 step)."""
    blocks = -(-inputs // BLOCK)
    if scales.dim() == 1:
        return scales.to(torch.float16)[:, None].expand(-1, blocks).contiguous()
    if scales.shape[1] != blocks:
        raise ValueError(f"{tuple(scales.shape)} scales for {inputs} inputs: need {blocks} blocks of {BLOCK}")
    return scales.to(torch.float16).contiguous()


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 weights (rows, inputs) from int8 values and their per-block float16 scales."""
    rows, inputs = values.shape
    blocks = scales.shape[1]
    w = torch.zeros(rows, blocks * BLOCK)
    w[:, :inputs] = values
    return w.view(rows, blocks, BLOCK).mul_(scales.float()[..., None]).view(rows, -1)[:, :inputs]


class Int4Linear(torch.nn.Module):
    """A Linear with 4-bit weights, asymmetric per group of inputs (w ≈ q × scale + low, q in 0..15),
    kept in `quantize`'s form for the compiled kernel, or packed for PyTorch's int4 kernel without it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        group = int4_group(weight.shape)
        if group is None:
            raise ValueError(f"int4 needs outputs divisible by 16, inputs by 32: {tuple(weight.shape)}")
        self._setup(*quantize_int4_groups(weight.detach(), group), bias)

    @classmethod
    def from_groups(
        cls, q4: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, bias: torch.Tensor | None
    ) -> Int4Linear:
        """The layer from `quantize`'s int4 form."""
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer._setup(q4, scales, lows, bias)
        return layer

    def _setup(
        self, q4: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        rows, half = q4.shape
        self.out_features, self.in_features = rows, half * 2
        group = self.in_features // scales.shape[1]
        if group != INT4_GROUP:  # an older checkpoint's larger groups, as groups of 32
            scales = scales.repeat_interleave(group // INT4_GROUP, dim=1)
            lows = lows.repeat_interleave(group // INT4_GROUP, dim=1)
        self.group = INT4_GROUP
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.plan = kernel_plan()
        self._kernel: Callable[..., torch.Tensor] | None = None
        if self.plan["int4 decode"] == "qwenbox":
            library = kernels.library()
            assert library is not None
            # looked up once: a decode step makes ~200 products, each a few microseconds of Python.
            # Prompts too (see the module's docstring: a prompt kernel of its own lost in the model)
            self._kernel = library.int4_matmul
            self.q4 = q4.contiguous()
            self.scales, self.lows = (
                scales.to(torch.float16).contiguous(),
                lows.to(torch.float16).contiguous(),
            )
        else:
            self.packed, self.scales_zeros = pack_int4_for_aten(q4, scales, lows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._kernel is not None:  # decode and prompts alike (see choose_kernels)
            if rows.dtype != torch.float32 or not rows.is_contiguous():
                rows = rows.float().contiguous()
            out = self._kernel(rows, self.q4, self.scales, self.lows, self.bias)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16), self.packed, self.group, self.scales_zeros
            )
            if self.bias is not None:
                out = out.float() + self.bias
        out = out.view(*x.shape[:-1], self.out_features)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def dequantize_int4(q4: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor) -> torch.Tensor:
    """float32 weights (rows, inputs) from rows of `quantize`'s int4 form: w = q × scale + low."""
    rows, half = q4.shape
    q = torch.stack([q4 & 15, q4 >> 4], dim=-1).view(rows, scales.shape[1], -1).float()
    return q.mul_(scales.float()[..., None]).add_(lows.float()[..., None]).view(rows, half * 2)


def pack_int4_for_aten(
    q4: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize`'s int4 form packed for `aten._weight_int4pack_mm_for_cpu` (the fallback): values
    interleaved within blocks of 64 rows, and its (groups, rows, 2) table of bf16 scale and zero in
    the kernel's convention w = (q - 8) × scale + zero, so zero = low + 8 × scale."""
    rows, half = q4.shape
    packed = torch.empty(rows, half, dtype=torch.uint8)
    for start in range(0, rows, 2048):
        block = q4[start : start + 2048]
        unpacked = torch.stack([block & 15, block >> 4], dim=-1).view(block.shape[0], -1)
        packed[start : start + block.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpacked.to(torch.int32), 1
        )
    zeros = lows.float() + 8 * scales.float()
    scales_zeros = torch.stack([scales.T.to(torch.bfloat16), zeros.T.to(torch.bfloat16)], dim=-1)
    return packed, scales_zeros.contiguous()


def int4_group(shape: tuple[int, ...] | torch.Size) -> int | None:
    """The group size the int4 kernel would use for a (outputs, inputs) matrix, or None if it cannot."""
    rows, cols = shape
    if rows % 16 or cols % INT4_GROUP:
        return None
    return INT4_GROUP


def quantized_linear(bits: int, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """An int8 or int4 Linear from float weights; int4 falls back to int8 for shapes its kernel
    does not take (a vocabulary that is not a multiple of 16, say)."""
    return from_quantized(quantize(bits, weight), bias)


def quantize(bits: int, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Linear weight in its stored quantized form, independent of any kernel's packing: what a
    pre-quantized checkpoint holds, and what `from_quantized` turns into a layer.

    - int8: ``values`` int8 (outputs, inputs) and ``scales`` float16 (outputs, ceil(inputs / 32)):
      w ≈ values × scale of the input's block of 32 (`quantize_blocks`).
    - int4: ``q4`` uint8 (outputs, inputs / 2), two 4-bit values per byte (even input in the low
      nibble), and ``scales`` / ``lows`` float16 (outputs, inputs / 32): w ≈ q × scale + low.
      A shape the int4 kernel cannot take is stored in the int8 form instead.
    """
    if bits == 4 and (group := int4_group(weight.shape)):
        q, scales, lows = quantize_int4_groups(weight.detach(), group)
        return {"q4": q, "scales": scales, "lows": lows}
    values, scales = quantize_blocks(weight.detach())
    return {"values": values, "scales": scales}


def from_quantized(tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.nn.Module:
    """The layer for tensors in `quantize`'s form, packed for this machine's kernel."""
    if "q4" in tensors:
        return Int4Linear.from_groups(tensors["q4"], tensors["scales"], tensors["lows"], bias)
    return Int8Linear(tensors["values"], tensors["scales"], bias)


class Int8Embedding(torch.nn.Module):
    """Token embeddings as int8 rows with a float16 scale per block of 32 (the int8 Linear's form, so a
    tied head is this table): half of bf16's memory for a table that is a sixth of a small model
    (151,936 × 1,536 in Qwen2.5-1.5B). A step looks up a few rows and turns only those back into floats."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = values.shape
        self.values, self.scales, self.dtype = values, block_scales(scales, self.embedding_dim), dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_int8(self.values[flat], self.scales[flat])
        return rows.view(*ids.shape, self.embedding_dim).to(self.dtype)


def quantize_blocks(weight: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with a scale per output row and block of 32 inputs (llama.cpp's Q8_0), as
    (values int8 (rows, inputs), scales float16 (rows, ceil(inputs / 32))): scale = max|w_block| / 127
    rounded to float16, values = w / scale rounded to nearest (a last block of inputs % 32 when the
    inputs are not a multiple of 32). A few rows at a time: the float32 copy the arithmetic needs is
    never larger than `chunk` rows (the output head has 152k)."""
    rows, inputs = weight.shape
    blocks = -(-inputs // BLOCK)
    values = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, blocks, dtype=torch.float16)
    for start in range(0, rows, chunk):
        w = weight[start : start + chunk].to(torch.float32, copy=True)
        w = torch.nn.functional.pad(w, (0, blocks * BLOCK - inputs)).view(w.shape[0], blocks, BLOCK)
        scale = (w.abs().amax(dim=-1) / 127).to(torch.float16)
        wide = scale.float()
        inverse = torch.where(wide > 0, 1 / wide, torch.zeros_like(wide))
        q = w.mul_(inverse[..., None]).round_().clamp_(-127, 127).view(w.shape[0], -1)[:, :inputs]
        values[start : start + chunk].copy_(q)
        scales[start : start + chunk] = scale
    return values, scales


def quantize_int4_groups(
    weight: torch.Tensor, group: int, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit values two per byte in plain order (even input in the low nibble) with a float16 scale
    and low per group of `group` inputs: w ≈ q × scale + low, q in 0..15, the values rounded against
    the float16 scale and low they are stored with (weights already on a Q4_1 grid, as GGUF files
    of 4-bit models hold, come back exactly)."""
    rows, cols = weight.shape
    q4 = torch.empty(rows, cols // 2, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group, dtype=torch.float16)
    lows = torch.empty(rows, cols // group, dtype=torch.float16)
    for start in range(0, rows, chunk):
        w = weight[start : start + chunk].to(torch.float32, copy=True).view(-1, cols // group, group)
        low = w.amin(dim=-1).to(torch.float16)
        scale = ((w.amax(dim=-1) - low.float()) / 15).to(torch.float16)
        inverse = torch.where(scale > 0, 1 / scale.float(), torch.zeros_like(scale, dtype=torch.float32))
        w = w.sub_(low.float()[..., None]).mul_(inverse[..., None])
        q = w.round_().clamp_(0, 15).to(torch.uint8)
        q = q.view(q.shape[0], cols // 2, 2)
        q4[start : start + chunk] = q[..., 0] | (q[..., 1] << 4)
        scales[start : start + chunk], lows[start : start + chunk] = scale, low
    return q4, scales, lows
