"""Quantized layers: weights in fewer bits, for a CPU whose decode speed is its memory bandwidth.

Generating a token reads every weight once, so bytes per weight set the pace: bf16 reads 2, int8
1, int4 half a byte. The layers keep the weights in `quantize`'s stored form (what a pre-quantized
checkpoint holds), so loading packs nothing, and compute with the kernels chosen once for this CPU
(`kernel_plan`, logged at the first layer):

- decode (a few activation rows): the compiled kernels of `kernels.py` (AVX2 + FMA, int8 rows and
  int4 groups read as stored, multiplied in integers with the activation rows quantized to int8
  per row), near memory speed;
- a prompt (more rows): int8 through the compiled prompt kernel (`int8_prompt_matmul`: the same
  stored rows, a register tile of 2 activation rows x 4 weight rows in integers, the activations
  packed once per call and blocked so tiles read L1 and L2, compute-bound),
  which replaced oneDNN's int8 GEMM (`onednn.qlinear_pointwise`) because oneDNN cannot read the
  plain matrix: it reordered the weights and built a new primitive on every call, as much time as
  the product itself at 128-row pieces, and keeping reordered copies would double the weights'
  memory; oneDNN stays the path without the compiled kernels. int4 prompts through the int4
  decode kernel (8x faster than float32 products of dequantized rows on an AVX2 EPYC); an int4
  prompt kernel (4 weight rows unpacked once per piece of K, 2 x 4 tiles summed in int16 per group)
  was 20-30 % faster alone but read a 256-token prompt slower inside the model in two sessions'
  interleaved A/B (4.93 s against 3.84 on the lean path, 2-core AVX2 EPYC), so it was removed;
- without the compiled kernels (no compiler, no AVX2): PyTorch's weight-only kernels
  (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) on bf16 rows: supported, slower.

- `Int8Linear`: one scale per output row.
- `Int4Linear`: 4-bit weights with a scale and low per group of 128 (or 64, 32) inputs.
- `Int8Embedding`: the token table as int8 rows; a step looks up a few rows.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from . import kernels

log = logging.getLogger(__name__)

INT4_GROUPS = (128, 64, 32)  # group sizes the CPU kernel takes, largest (fewest scales) first
# Layers the decode step (decoder.py) fuses into one product, by their names under a decoder layer's
# attention and MLP, in output order. The checkpoint writer stores each group's weight rows one after
# another, so that fusing them at load is a view of the mapped file, not a copy (decoder._joined).
FUSED: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
DECODE_ROWS = 8  # activation rows up to which a product is a decode step (bandwidth-bound)


@functools.cache
def kernel_plan() -> dict[str, str]:
    """Which kernel computes what on this CPU, decided once (and logged once)."""
    plan = choose_kernels(
        compiled=kernels.available(),
        onednn=hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available(),
        vnni=_has_vnni(),
    )
    log.info("quantized kernels: %s", ", ".join(f"{k}: {v}" for k, v in plan.items()))
    return plan


def _has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI), which oneDNN's
    int8 GEMM uses and the compiled prompt kernel (AVX2 vpmaddubsw) does not."""
    return bool(kernels.cpu_flags() & {"avx512_vnni", "avx_vnni"})


def choose_kernels(*, compiled: bool, onednn: bool, vnni: bool = False) -> dict[str, str]:
    """The kernel for each kind of product, given what this machine has: the compiled kernels for
    decode (measured on an AVX2 EPYC: as fast as fbgemm's at one row) and int8 prompts (no
    per-call weight reorder, unlike oneDNN's int8 GEMM, the prompt path without them), the compiled
    int4 kernel for int4 prompts too; PyTorch's weight-only kernels on bf16 rows without a
    compiler. With VNNI, int8 prompts stay on oneDNN, whose VNNI kernels the AVX2 prompt kernel was
    not measured against."""
    if compiled and not (vnni and onednn):
        int8_prompt = "qwenbox"
    elif onednn:
        int8_prompt = "onednn.qlinear_pointwise"
    else:
        int8_prompt = "float32 mm of dequantized rows"
    return {
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "int8 decode": "qwenbox" if compiled else "aten._weight_int8pack_mm (bf16)",
        "int8 prompt": int8_prompt,
        "int4 decode": "qwenbox" if compiled else "aten._weight_int4pack_mm_for_cpu (bf16)",
        "int4 prompt": "qwenbox" if compiled else "aten._weight_int4pack_mm_for_cpu (bf16)",
    }


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights, one float32 scale per output row (w ≈ values × scale)."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.values = values.contiguous()
        self.scales = scales.float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.plan = kernel_plan()
        # each weight row's sum, which the prompt kernel's activation zero point needs (kept: reading
        # the whole matrix again for it took 4 % of a prompt's product)
        self._row_sums: torch.Tensor | None = None
        if self.plan["int8 decode"] != "qwenbox":  # the fallback kernel takes bf16 scales
            self._scales_bf16 = self.scales.to(torch.bfloat16)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(*quantize_rows(weight.detach()), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= DECODE_ROWS:
            out = self._decode(rows)
        else:
            out = self._prompt(rows)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _decode(self, rows: torch.Tensor) -> torch.Tensor:
        if self.plan["int8 decode"] == "qwenbox":
            library = kernels.library()
            assert library is not None
            return library.int8_matmul(rows.float().contiguous(), self.values, self.scales, self.bias)
        out = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.values, self._scales_bf16)
        return out if self.bias is None else out.float() + self.bias

    def _prompt(self, rows: torch.Tensor) -> torch.Tensor:
        how = self.plan["int8 prompt"]
        if how == "qwenbox":
            library = kernels.library()
            assert library is not None
            if self._row_sums is None:  # once, at the first prompt: 4 bytes per output row
                self._row_sums = self.values.sum(dim=1, dtype=torch.int32)
            return library.int8_prompt_matmul(
                rows.float().contiguous(), self.values, self.scales, self._row_sums, self.bias
            )
        if how == "onednn.qlinear_pointwise":
            return onednn_int8(rows.float(), self.values, self.scales, self.bias)
        out = torch.empty(rows.shape[0], self.out_features)
        for start in range(0, self.out_features, 2048):  # never a float copy of the whole matrix
            w = self.values[start : start + 2048].float().mul_(self.scales[start : start + 2048, None])
            torch.matmul(rows.float(), w.T, out=out[:, start : start + 2048])
        return out if self.bias is None else out.add_(self.bias)


def onednn_int8(
    rows: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """float32 rows × int8 weights by oneDNN's int8 GEMM, the path PyTorch's own int8 export lowers
    to on x86: the rows quantized to uint8 with one scale and zero point, the weights reordered for
    oneDNN on each call (it cannot read a plain matrix; keeping a reordered copy would double the
    weights' memory, and the reorder is a few percent of a prompt's product)."""
    lowest, highest = torch.aminmax(rows)
    low, high = min(float(lowest), 0.0), max(float(highest), 0.0)
    # 7 bits (0..127): without VNNI, pairs of uint8 x int8 products are summed in int16 and could
    # saturate at full range (fbgemm's reduce_range, for the same reason)
    scale = max((high - low) / 127, 1e-8)
    zero = int(round(-low / scale))
    quantized = rows.div(scale).round_().add_(zero).clamp_(0, 127).to(torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(values, list(rows.shape))
    zeros = torch.zeros(values.shape[0], dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(
        quantized, scale, zero, packed, scales, zeros, bias, 1.0, 0, torch.float32, "none", [], ""
    )


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
        self.group = self.in_features // scales.shape[1]
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
                scales.to(torch.bfloat16).contiguous(),
                lows.to(torch.bfloat16).contiguous(),
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
    if rows % 16:
        return None
    return next((g for g in INT4_GROUPS if cols % g == 0), None)


def quantized_linear(bits: int, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """An int8 or int4 Linear from float weights; int4 falls back to int8 for shapes its kernel
    does not take (a vocabulary that is not a multiple of 16, say)."""
    return from_quantized(quantize(bits, weight), bias)


def quantize(bits: int, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Linear weight in its stored quantized form, independent of any kernel's packing: what a
    pre-quantized checkpoint holds, and what `from_quantized` turns into a layer.

    - int8: ``values`` int8 (outputs, inputs) and ``scales`` float32 (outputs,): w ≈ values × scale.
    - int4: ``q4`` uint8 (outputs, inputs / 2), two 4-bit values per byte (even input in the low
      nibble), and ``scales`` / ``lows`` bfloat16 (outputs, inputs / group): w ≈ q × scale + low.
      A shape the int4 kernel cannot take is stored in the int8 form instead.
    """
    if bits == 4 and (group := int4_group(weight.shape)):
        q, scales, lows = quantize_int4_groups(weight.detach(), group)
        return {"q4": q, "scales": scales, "lows": lows}
    values, scales = quantize_rows(weight.detach())
    return {"values": values, "scales": scales}


def from_quantized(tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.nn.Module:
    """The layer for tensors in `quantize`'s form, packed for this machine's kernel."""
    if "q4" in tensors:
        return Int4Linear.from_groups(tensors["q4"], tensors["scales"], tensors["lows"], bias)
    return Int8Linear(tensors["values"], tensors["scales"], bias)


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
        w = weight[start : start + chunk].to(torch.float32, copy=True)
        scale = (w.abs().amax(dim=1) / 127).clamp_(min=1e-8)
        values[start : start + chunk].copy_(w.div_(scale[:, None]).round_().clamp_(-127, 127))
        scales[start : start + chunk] = scale
    return values, scales


def quantize_int4_groups(
    weight: torch.Tensor, group: int, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit values two per byte in plain order (even input in the low nibble) with a bf16 scale and
    low per group of `group` inputs: w ≈ q × scale + low, q in 0..15."""
    rows, cols = weight.shape
    q4 = torch.empty(rows, cols // 2, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group, dtype=torch.bfloat16)
    lows = torch.empty(rows, cols // group, dtype=torch.bfloat16)
    for start in range(0, rows, chunk):
        w = weight[start : start + chunk].to(torch.float32, copy=True).view(-1, cols // group, group)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((high - low) / 15).clamp_(min=1e-8)
        q = w.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        q = q.view(q.shape[0], cols // 2, 2)
        q4[start : start + chunk] = q[..., 0] | (q[..., 1] << 4)
        scales[start : start + chunk], lows[start : start + chunk] = scale, low
    return q4, scales, lows
