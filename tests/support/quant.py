"""The quantized products' numbers computed the slow, obvious way in PyTorch, for the kernel tests.

Every int8 product is llama.cpp's Q8_0 x Q8_0: the activations quantized per row and block of 32
inputs (symmetric int8, scale = max|x_block| / 127 in float32, times 1 / scale rounded to nearest
even; a last block of K % 32 inputs), the weights int8 with a float16 scale per row and block, and
y[m, n] = bias[n] + sum over blocks b of (integer block dot) x (weight scale x activation scale).
"""

from __future__ import annotations

import torch

BLOCK = 32


def int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `x` (rows, K) as the kernels quantize them: int8 values (rows, blocks, 32) as float
    (zero past K) and the float32 scales (rows, blocks), in the kernels' float32 steps."""
    rows, k = x.shape
    blocks = -(-k // BLOCK)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * BLOCK - k)).view(rows, blocks, BLOCK)
    scale = padded.abs().amax(dim=-1) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (padded * inverse[..., None]).round().clamp(-127, 127), scale


def int8_blocks_dequantized(x: torch.Tensor) -> torch.Tensor:
    """`x` as the int8 products see it (each block rounded to its int8 steps), as float."""
    q, scale = int8_blocks(x)
    return (q * scale[..., None]).view(x.shape[0], -1)[:, : x.shape[1]]


def int8_per_row(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to int8 steps of max|row| / 127 (one scale per row: the int4 kernel's activations)."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-30)
    return (x / scale).round().clamp(-127, 127) * scale


def int8_product(
    x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The int8 kernels' result: exact integer block dots, the scale products in float32 as the
    kernels make them, summed in float64 (the kernels' float32 sums differ by rounding only)."""
    q, xs = int8_blocks(x)
    n, k = values.shape
    blocks = scales.shape[1]
    w = torch.nn.functional.pad(values.to(torch.float64), (0, blocks * BLOCK - k)).view(n, blocks, BLOCK)
    dots = torch.einsum("mbk,nbk->mnb", q.to(torch.float64), w)  # integers, exact in float64
    products = (scales.float()[None] * xs[:, None]).to(torch.float64)
    out = (dots * products).sum(dim=-1)
    return (out if bias is None else out + bias.to(torch.float64)).float()


def assert_float_rounding_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` (float32 sums of a few hundred scaled block dots) is `want` to float32 rounding: each
    element within 1e-5 of itself or of the largest element (sums that cancel keep the rounding of
    their terms)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))


def int4_product(
    x: torch.Tensor, q4: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The int4 kernel's result: per group of 32, the activations' int8 block (its scale xs) times
    w = q x scale + low as xs x (scale x integer dot(q, x_int) + low x sum(x_int)), summed in float64."""
    q, xs = int8_blocks(x)
    n = q4.shape[0]
    groups = scales.shape[1]
    nibbles = torch.stack([q4 & 15, q4 >> 4], dim=-1).view(n, groups, BLOCK).to(torch.float64)
    dots = torch.einsum("mbk,nbk->mnb", q.to(torch.float64), nibbles)  # integers, exact
    sums = q.to(torch.float64).sum(dim=-1)  # (rows, groups)
    scale, low = scales.to(torch.float64)[None], lows.to(torch.float64)[None]
    out = (xs.to(torch.float64)[:, None] * (scale * dots + low * sums[:, None])).sum(dim=-1)
    return (out if bias is None else out + bias.to(torch.float64)).float()
