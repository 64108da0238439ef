"""Quantized layers: weights in fewer bits, for a CPU whose decode speed is its memory bandwidth.

Generating a token reads every weight once, so bytes per weight set the pace: bf16 reads 2, int8
1, int4 half a byte. Each layer here keeps its weights in the layout of the PyTorch kernel that
computes it, packed once at load, and is made from one checkpoint tensor at a time.

- `Int8Linear`: one scale per output row, fbgemm's int8 GEMM with activations quantized on the fly.
  Fast for one token and for a long prompt alike (VNNI int8 dot products).
- `Int4Linear`: 4-bit weights with a scale and offset per group of 128 inputs, PyTorch's own CPU
  int4 weight-only kernel. Half int8's bytes, so the smallest models and fast decode, but the kernel
  is slow on long prompts (it unpacks weights for every row of a matrix product).
- `Int8Embedding`: the token table as int8 rows; a step looks up a few rows.
"""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message=".*quantiz.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantize_per_.*", category=UserWarning)

INT4_GROUPS = (128, 64, 32)  # group sizes the CPU kernel takes, largest (fewest scales) first


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


class Int4Linear(torch.nn.Module):
    """A Linear with 4-bit weights, asymmetric per group of inputs (w ≈ q × scale + low, q in 0..15),
    computed by `torch.ops.aten._weight_int4pack_mm_for_cpu` on bf16 activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = int4_group(weight.shape)
        if self.group is None:
            raise ValueError(f"int4 needs outputs divisible by 16, inputs by 32: {tuple(weight.shape)}")
        self.packed, self.scales_zeros = quantize_int4(weight.detach(), self.group)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    @classmethod
    def from_groups(
        cls, q4: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, bias: torch.Tensor | None
    ) -> Int4Linear:
        """The layer from `quantize`'s int4 form (packed here for the kernel, 64 rows at a time)."""
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        rows, half = q4.shape
        layer.out_features, layer.in_features = rows, half * 2
        layer.group = layer.in_features // scales.shape[1]
        layer.packed = torch.empty(rows, half, dtype=torch.uint8)
        for start in range(0, rows, 2048):
            block = q4[start : start + 2048]
            unpacked = torch.stack([block & 15, block >> 4], dim=-1).view(block.shape[0], -1)
            layer.packed[start : start + block.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpacked.to(torch.int32), 1
            )
        zeros = lows.float() + 8 * scales.float()
        layer.scales_zeros = torch.stack([scales.T.to(torch.bfloat16), zeros.T.to(torch.bfloat16)], dim=-1)
        layer.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


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


def quantize_int4(weight: torch.Tensor, group: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit values packed for the CPU kernel (two per byte, interleaved within blocks of 64 rows, so
    a multiple of 64 rows at a time) and its (inputs / group, rows, 2) table of bf16 scale and zero,
    the kernel's convention: w = (q - 8) × scale + zero, so zero = low + 8 × scale."""
    rows, cols = weight.shape
    chunk = max(64, chunk - chunk % 64)
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    scales_zeros = torch.empty(cols // group, rows, 2, dtype=torch.bfloat16)
    for start in range(0, rows, chunk):
        w = weight[start : start + chunk].to(torch.float32, copy=True).view(-1, cols // group, group)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((high - low) / 15).clamp_(min=1e-8)
        q = w.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
        n = q.shape[0]
        packed[start : start + n] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.view(n, cols).to(torch.int32), 1
        )
        scales_zeros[:, start : start + n, 0] = scale.T
        scales_zeros[:, start : start + n, 1] = (low + 8 * scale).T
    return packed, scales_zeros


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
