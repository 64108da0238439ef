"""The compiled int8 prompt kernel (`int8_prompt_matmul`, many activation rows) against a float
reference: exactly the integer product of its 7-bit activations, at row counts that leave tile
tails on both sides (an odd activation row, 1-3 weight rows past the last group of 4), inputs that
are not a multiple of its 32-byte step, K split into pieces and rows into blocks, with and without
bias, and through `Int8Linear` above the decode row count."""

from __future__ import annotations

import pytest
import torch

from service.inference import kernels, quantized
from service.inference.quantized import choose_kernels, quantize

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no compiled kernels here")


def u7_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as the prompt kernel sees it: each row rounded to 128 steps between min(row, 0) and
    max(row, 0), with a zero point, as (u - z) x scale."""
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    high = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = torch.where(high > low, (high - low) / 127, torch.ones_like(high))
    zero = (-low / scale).round()
    return ((x * (1 / scale)).round() + zero).clamp(0, 127).sub(zero) * scale


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# odd counts leave one activation row over; 256 rows of 1536 inputs and 127 of 8960 are two blocks
@pytest.mark.parametrize("rows", [1, 9, 10, 127, 256])
# weight rows not a multiple of 4; 8960 and 3104 inputs are three and two pieces of K (the second
# shorter); 45 and 33 inputs end inside a 32-byte step
@pytest.mark.parametrize("shape", [(1536, 1536), (37, 96), (6, 8960), (5, 3104), (40, 45), (3, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_prompt_kernel_is_the_integer_product_of_its_rounded_rows(rows, shape, bias):
    torch.manual_seed(rows + shape[0])
    weight = torch.randn(shape) * torch.linspace(0.1, 3, shape[1])
    tensors = quantize(8, weight)
    w = tensors["values"].float() * tensors["scales"][:, None]
    b = torch.randn(shape[0]) if bias else None
    x = torch.randn(rows, shape[1]) * 2 + 0.5  # off-centre: the zero point matters
    got = kernels.library().int8_prompt_matmul(x, tensors["values"], tensors["scales"], None, b)
    sums = tensors["values"].sum(dim=1, dtype=torch.int32)  # kept by the caller: the same answer
    assert torch.equal(
        kernels.library().int8_prompt_matmul(x, tensors["values"], tensors["scales"], sums, b), got
    )
    plus = b if bias else 0
    # exact up to float32 rounding of the rescale: the integer sums themselves are exact
    assert relative_error(got, u7_rows(x) @ w.T + plus) < 1e-5
    # and 7 bits per row is that close to float (a single row of 6 outputs: up to ~3 %)
    assert relative_error(got, x @ w.T + plus) < 4e-2


def test_rows_of_one_sign_and_zero_rows_are_exact():
    """A row that is all positive (zero point 0), all negative (zero point 127) or all zero (no
    range: scale 1) keeps its sign and gives zeros where it should."""
    torch.manual_seed(5)
    tensors = quantize(8, torch.randn(40, 64))
    w = tensors["values"].float() * tensors["scales"][:, None]
    x = torch.stack([torch.rand(64) + 0.1, -torch.rand(64) - 0.1, torch.zeros(64)] * 4)
    got = kernels.library().int8_prompt_matmul(x, tensors["values"], tensors["scales"], None, None)
    assert torch.equal(got[2], torch.zeros(40))
    assert relative_error(got, u7_rows(x) @ w.T) < 1e-5


def test_int8_linear_reads_prompts_with_it_whatever_its_inputs(monkeypatch):
    """Above `DECODE_ROWS` rows an Int8Linear uses the prompt kernel, also for inputs that are not
    a multiple of its 32-byte step (padded with zeros, which add nothing)."""
    monkeypatch.setattr(quantized, "kernel_plan", lambda: choose_kernels(compiled=True, onednn=True))
    assert quantized.kernel_plan()["int8 prompt"] == "qwenbox"
    assert choose_kernels(compiled=True, onednn=True, vnni=True)["int8 prompt"] == "onednn.qlinear_pointwise"
    torch.manual_seed(7)
    for inputs in (96, 45):
        tensors = quantize(8, torch.randn(24, inputs))
        layer = quantized.from_quantized(tensors, None)
        x = torch.randn(3, 7, inputs)  # 21 rows: a prompt
        got = layer(x)
        w = tensors["values"].float() * tensors["scales"][:, None]
        assert got.shape == (3, 7, 24)
        assert relative_error(got, u7_rows(x) @ w.T) < 1e-5


def test_int4_linear_reads_prompts_with_the_decode_kernel():
    """Prompts (above `DECODE_ROWS` rows) go through the int4 decode kernel for every group size (an
    int4 prompt kernel, faster alone, read prompts slower inside the model, and was removed)."""
    torch.manual_seed(11)
    x = torch.randn(3, 7, 256)  # 21 rows: a prompt
    for group in (128, 64, 32):
        q4, scales, lows = quantized.quantize_int4_groups(torch.randn(20, 256), group)
        layer = quantized.Int4Linear.from_groups(q4, scales, lows, None)
        got = layer(x)
        want = kernels.library().int4_matmul(x.reshape(21, 256), q4, scales, lows, None)
        assert got.shape == (3, 7, 20)
        assert torch.equal(got.reshape(21, 20), want)
