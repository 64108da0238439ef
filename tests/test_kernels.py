"""The quantized products against a float reference of the same quantized weights: the compiled
kernels at every decode row count and odd shapes, the prompt paths, and PyTorch's fallback kernels."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from service.inference import kernels, quantized
from service.inference.quantized import (
    Int4Linear,
    Int8Linear,
    choose_kernels,
    dequantize_int4,
    dequantize_int8,
    quantize,
)
from tests.support.quant import (
    assert_float_rounding_close,
    int4_product,
    int8_blocks_dequantized,
    int8_product,
)

COMPILED = choose_kernels(compiled=True)
FALLBACK = choose_kernels(compiled=False)


def reference(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weights the stored form stands for."""
    if "q4" in tensors:
        return dequantize_int4(tensors["q4"], tensors["scales"], tensors["lows"])
    return dequantize_int8(tensors["values"], tensors["scales"])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def test_the_kernels_build_on_an_x86_machine_with_a_compiler():
    """CI and the image have g++: the compiled kernels must be there, not silently the fallback."""
    if platform.machine() != "x86_64" or not shutil.which("g++") or not kernels.cpu_supported():
        pytest.skip("the compiled kernels are for x86 CPUs with AVX2 and a C++ compiler")
    assert kernels.available()
    assert quantized.kernel_plan()["int8 decode"] == "qwenbox"


@pytest.mark.parametrize("bits", [8, 4])
# odd row counts; int4 groups of 32 with a last half vector (96), 8 groups (256), a lone group (32),
# 6 (192) and 36 groups (1152): the lows taken 8 groups a vector plus the rest one by one
@pytest.mark.parametrize("shape", [(37, 96), (130, 256), (16, 32), (37, 192), (48, 1152)])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_kernels_match_a_float_reference_at_every_decode_row_count(bits, shape, bias, monkeypatch):
    if not kernels.available():
        pytest.skip("no compiled kernels here")
    monkeypatch.setattr(quantized, "kernel_plan", lambda: COMPILED)
    if bits == 4:  # the stored int4 form takes multiples of 16 outputs (else it is stored as int8)
        shape = (shape[0] + -shape[0] % 16, shape[1])
    torch.manual_seed(bits + shape[0])
    weight = torch.randn(shape) * torch.linspace(0.1, 3, shape[1])
    b = torch.randn(shape[0]) if bias else None
    tensors = quantize(bits, weight)
    assert ("q4" in tensors) == (bits == 4)
    layer = quantized.from_quantized(tensors, b)
    w = reference(tensors)
    for rows in (*range(1, 10), 33):  # 1..8 through the decode kernel, more through the prompt path
        x = torch.randn(rows, shape[1])
        want = x @ w.T + (b if bias else 0)
        got = layer(x)
        # the products quantize the activations too: int8 per row and block of 32
        assert relative_error(got, want) < 2e-2, rows
        seen = int8_blocks_dequantized(x)
        # exactly the integer product of the int8 activations, rescaled
        assert relative_error(got, seen @ w.T + (b if bias else 0)) < 1e-5, rows


def test_int8_kernel_takes_odd_input_counts_and_keeps_the_activation_dtype(monkeypatch):
    """K not a multiple of 8 (the kernel's vector width) goes through its scalar tail; a bf16
    input gives a bf16 output, leading dimensions are kept."""
    if not kernels.available():
        pytest.skip("no compiled kernels here")
    monkeypatch.setattr(quantized, "kernel_plan", lambda: COMPILED)
    torch.manual_seed(1)
    tensors = quantize(8, torch.randn(21, 45))
    layer = quantized.from_quantized(tensors, None)
    x = torch.randn(2, 3, 45)
    got = layer(x)
    assert got.shape == (2, 3, 21) and got.dtype == torch.float32
    seen = int8_blocks_dequantized(x.reshape(6, 45)).reshape(2, 3, 45)
    assert relative_error(got, seen @ reference(tensors).T) < 1e-5
    assert layer(x.bfloat16()).dtype == torch.bfloat16


# K with a tail of 1..31 inputs past whole blocks of 32 (45, 1552 + 17), fewer than 32 (17), one block
# (32), rows short (<= 2048: prefetched as one run) and long (2087, 2112, 8960); N odd (the last weight
# row alone)
SHAPES = [(37, 45), (33, 96), (16, 32), (3, 17), (35, 1569), (19, 2087), (8, 2112), (5, 8960)]


def int8_weights(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values with the extremes in them and random float16 block scales of several magnitudes."""
    values = torch.randint(-127, 128, shape, dtype=torch.int8)
    values[0] = 127  # the largest pairs: 2 x 127 x 127 in int16 must not saturate
    values[-1, ::2] = -127
    blocks = -(-shape[1] // 32)
    scales = (torch.rand(shape[0], blocks) * torch.logspace(-4, 0, blocks)).half()
    return values, scales


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_kernels_are_the_integer_block_product(shape):
    """Both int8 kernels (decode: 1-8 rows; prompts: any number) against the same integer math done
    in PyTorch (activations quantized per row and block of 32, integer block dots, scaled sums), to
    float rounding, at 1..9 rows and 33, with and without bias; the decode kernel's 3-4 rows go
    through the batch tile (`int8q_tile_batch2`: rows packed per 32 inputs, the loop in assembly),
    5-8 as 4 then the rest, 1-2 rows through `int8q_tile`: each row's result must be exactly, to the
    bit, its result alone."""
    library = kernels.library()
    if library is None:
        pytest.skip("no compiled kernels here")
    torch.manual_seed(shape[0] * shape[1])
    values, scales = int8_weights(shape)
    bias = torch.randn(shape[0])
    for rows in (*range(1, 10), 33):
        x = torch.randn(rows, shape[1]) * torch.linspace(0.1, 3, rows)[:, None]
        x[0, ::3] = -x[0].abs().amax()  # inputs at -127 x their block's scale
        if rows > 1:
            x[1, : min(32, shape[1])] = 0  # an all-zero block: scale 0, contributes nothing
        for b in (None, bias):
            want = int8_product(x, values, scales, b)
            got_prompt = library.int8_prompt_matmul(x, values, scales, b)
            assert_float_rounding_close(got_prompt, want)
            if rows > quantized.DECODE_ROWS:
                continue
            got = library.int8_matmul(x, values, scales, b)
            alone = torch.cat([library.int8_matmul(x[i : i + 1], values, scales, b) for i in range(rows)])
            assert torch.equal(got, alone), rows
            assert_float_rounding_close(got, want)


def test_int8_kernels_quantize_activations_per_block_not_per_row():
    """An activation row with one huge outlier channel: one scale per row would round every other
    input (100 000 times smaller) to zero; per block of 32 only the outlier's own block loses them."""
    library = kernels.library()
    if library is None:
        pytest.skip("no compiled kernels here")
    torch.manual_seed(3)
    values, scales = quantize(8, torch.randn(24, 256)).values()
    w = dequantize_int8(values, scales)
    for rows in (1, 2, 3, 4, 7, 40):
        x = torch.randn(rows, 256) * 1e-3
        x[:, 5] = 100.0
        outlier = x[:, 5:6] @ w[:, 5:6].T
        rest = x[:, 32:] @ w[:, 32:].T  # the blocks without the outlier
        kernel = library.int8_matmul if rows <= quantized.DECODE_ROWS else library.int8_prompt_matmul
        got = kernel(x, values, scales, None)
        # per row this would be 100 % of `rest` (all rounded to zero); per block about 1 %
        assert relative_error(got - outlier, rest) < 0.05, rows


@pytest.mark.parametrize("bits", [8, 4])
def test_fallback_kernels_match_the_same_reference(bits, monkeypatch):
    """Without a compiler int8 layers multiply float32 rows by their dequantized weights (exact to
    float rounding), int4 layers use PyTorch's weight-only kernel on bf16 rows (to bf16 rounding)."""
    monkeypatch.setattr(quantized, "kernel_plan", lambda: FALLBACK)
    torch.manual_seed(2)
    weight = torch.randn(96, 256)
    tensors = quantize(bits, weight)
    layer = quantized.from_quantized(tensors, torch.randn(96))
    assert not hasattr(layer, "q4")  # packed for PyTorch's kernel, not kept for the compiled one
    for rows in (1, 4, 9, 40):
        x = torch.randn(rows, 256)
        want = x @ reference(tensors).T + layer.bias
        assert relative_error(layer(x), want) < (2e-2 if bits == 4 else 1e-6), rows


def test_int4_needs_a_group_the_kernels_take():
    with pytest.raises(ValueError):
        Int4Linear(torch.randn(20, 64), None)  # 20 outputs: not a multiple of 16
    assert isinstance(quantized.from_quantized(quantize(4, torch.randn(20, 64)), None), Int8Linear)


def test_int4_kernel_does_not_saturate_at_the_largest_values(monkeypatch):
    """Every 4-bit value 15 and every activation at +-127 of its block's scale: a pair's products
    in int16 reach 2 x 15 x 127, and the even and odd pairs added 4 x 15 x 127 = 7620, which must
    not wrap."""
    if not kernels.available():
        pytest.skip("no compiled kernels here")
    monkeypatch.setattr(quantized, "kernel_plan", lambda: COMPILED)
    weight = torch.full((32, 512), 2.0)
    weight[:, ::32] = -1.0  # one low per group: the rest of the group quantizes to q = 15
    tensors = quantize(4, weight)
    assert int((tensors["q4"] >> 4).amin()) == 15
    layer = quantized.from_quantized(tensors, None)
    for x in (torch.full((1, 512), 3.0), torch.full((3, 512), -3.0)):
        want = x @ reference(tensors).T
        assert relative_error(layer(x), want) < 1e-5


@pytest.mark.parametrize("shape", [(37, 96), (32, 64), (16, 32), (48, 1152), (21, 8960)])
def test_int4_kernel_is_the_integer_group_product(shape):
    """The int4 kernel against the same integer math in PyTorch: per group of 32 the activations'
    int8 block times the group's nibbles and sums, scaled (tests/support/quant.py), at 1..9 and 33
    rows (odd weight row counts: the kernel itself takes any), with and without bias; a row's result
    is its result alone."""
    library = kernels.library()
    if library is None:
        pytest.skip("no compiled kernels here")
    torch.manual_seed(shape[0] + shape[1])
    q4, scales, lows = quantized.quantize_int4_groups(
        torch.randn(shape) * torch.linspace(0.1, 3, shape[1]), 32
    )
    bias = torch.randn(shape[0])
    for rows in (*range(1, 10), 33):
        x = torch.randn(rows, shape[1]) * torch.linspace(0.1, 3, rows)[:, None]
        if rows > 1:
            x[1, :32] = 0  # an all-zero block
        for b in (None, bias):
            got = library.int4_matmul(x, q4, scales, lows, b)
            assert_float_rounding_close(got, int4_product(x, q4, scales, lows, b))
            alone = torch.cat([library.int4_matmul(x[i : i + 1], q4, scales, lows, b) for i in range(rows)])
            assert torch.equal(got, alone), rows


def test_int4_of_larger_groups_loads_as_groups_of_32(monkeypatch):
    """A checkpoint written with groups of 128 or 64 (format version 1) gives the layer those
    weights, each group's scale and low repeated over its 32s."""
    if not kernels.available():
        pytest.skip("no compiled kernels here")
    monkeypatch.setattr(quantized, "kernel_plan", lambda: COMPILED)
    torch.manual_seed(4)
    x = torch.randn(5, 256)
    for group in (128, 64):
        q4, scales, lows = quantized.quantize_int4_groups(torch.randn(32, 256), group)
        layer = Int4Linear.from_groups(q4, scales, lows, None)
        assert layer.group == 32 and layer.scales.shape == (32, 8)
        assert torch.equal(
            dequantize_int4(layer.q4, layer.scales, layer.lows), dequantize_int4(q4, scales, lows)
        )
        assert relative_error(layer(x), x @ dequantize_int4(q4, scales, lows).T) < 2e-2
