"""The compiled int8 prompt kernel (`int8_prompt_matmul`, many activation rows) against the same
integer math done in PyTorch (tests/support/quant.py: activations per row and block of 32, integer
block dots, scaled sums), at row counts that leave a partial group of 4 activation rows, weight rows
that leave a partial panel of 16, inputs that end inside a block of 32, with and without bias, and
through `Int8Linear` above the decode row count."""

from __future__ import annotations

import pytest
import torch

from service.inference import kernels, quantized
from service.inference.quantized import choose_kernels, dequantize_int8, quantize
from tests.support.quant import assert_float_rounding_close, int8_blocks_dequantized, int8_product

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no compiled kernels here")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# 1-3 rows past a group of 4; 256 rows of a prompt
@pytest.mark.parametrize("rows", [1, 9, 10, 127, 256])
# weight rows not a multiple of 16 (a partial panel) and of 4; 8960 and 3104 inputs; 45 and 33 end
# inside a block of 32
@pytest.mark.parametrize("shape", [(1536, 1536), (37, 96), (6, 8960), (5, 3104), (40, 45), (3, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_prompt_kernel_is_the_integer_block_product(rows, shape, bias):
    torch.manual_seed(rows + shape[0])
    weight = torch.randn(shape) * torch.linspace(0.1, 3, shape[1])
    values, scales = quantize(8, weight).values()
    b = torch.randn(shape[0]) if bias else None
    x = torch.randn(rows, shape[1]) * 2 + 0.5
    got = kernels.library().int8_prompt_matmul(x, values, scales, b)
    assert_float_rounding_close(got, int8_product(x, values, scales, b))
    # and int8 per block of 32 is that close to float (a single row of 6 outputs: up to ~1 %)
    plus = b if bias else 0
    assert relative_error(got, x @ dequantize_int8(values, scales).T + plus) < 2e-2


def test_rows_of_one_sign_and_zero_rows_are_exact():
    """A row that is all positive, all negative or all zero (every block's scale 0) keeps its sign
    and gives zeros where it should."""
    torch.manual_seed(5)
    values, scales = quantize(8, torch.randn(40, 64)).values()
    x = torch.stack([torch.rand(64) + 0.1, -torch.rand(64) - 0.1, torch.zeros(64)] * 4)
    got = kernels.library().int8_prompt_matmul(x, values, scales, None)
    assert torch.equal(got[2], torch.zeros(40))
    assert_float_rounding_close(got, int8_product(x, values, scales, None))


def test_a_row_is_the_same_whatever_rows_come_with_it():
    """Batching does not change answers: a row's result is its result alone, to the bit, wherever
    it sits in the groups of 4."""
    torch.manual_seed(9)
    values, scales = quantize(8, torch.randn(50, 200)).values()
    x = torch.randn(13, 200)
    got = kernels.library().int8_prompt_matmul(x, values, scales, None)
    for i in (0, 5, 12):
        alone = kernels.library().int8_prompt_matmul(x[i : i + 1], values, scales, None)
        assert torch.equal(got[i : i + 1], alone)
        shifted = kernels.library().int8_prompt_matmul(x[i - 1 :] if i else x, values, scales, None)
        assert torch.equal(shifted[1 if i else 0], got[i])


def test_int8_linear_reads_prompts_with_it_whatever_its_inputs(monkeypatch):
    """Above `DECODE_ROWS` rows an Int8Linear uses the prompt kernel, also for inputs that are not
    a multiple of 32; every CPU with the compiled kernels takes it (no oneDNN path)."""
    monkeypatch.setattr(quantized, "kernel_plan", lambda: choose_kernels(compiled=True))
    assert quantized.kernel_plan()["int8 prompt"] == "qwenbox"
    assert not any("onednn" in v for v in choose_kernels(compiled=False).values())
    torch.manual_seed(7)
    for inputs in (96, 45):
        values, scales = quantize(8, torch.randn(24, inputs)).values()
        layer = quantized.from_quantized({"values": values, "scales": scales}, None)
        x = torch.randn(3, 7, inputs)  # 21 rows: a prompt
        got = layer(x)
        assert got.shape == (3, 7, 24)
        seen = int8_blocks_dequantized(x.reshape(21, inputs)).reshape(3, 7, inputs)
        assert relative_error(got, seen @ dequantize_int8(values, scales).T) < 1e-5


def test_int4_linear_reads_prompts_with_the_decode_kernel():
    """Prompts (above `DECODE_ROWS` rows) go through the int4 decode kernel (an int4 prompt kernel,
    faster alone, read prompts slower inside the model, and was removed)."""
    torch.manual_seed(11)
    x = torch.randn(3, 7, 256)  # 21 rows: a prompt
    q4, scales, lows = quantized.quantize_int4_groups(torch.randn(32, 256), 32)
    layer = quantized.Int4Linear.from_groups(q4, scales, lows, None)
    got = layer(x)
    want = kernels.library().int4_matmul(x.reshape(21, 256), q4, scales, lows, None)
    assert got.shape == (3, 7, 32)
    assert torch.equal(got.reshape(21, 32), want)
