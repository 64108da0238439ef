"""The quantized products against a float reference of the same quantized weights: the compiled
kernels at every decode row count and odd shapes, the prompt paths, and PyTorch's fallback kernels."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from service.inference import kernels, quantized
from service.inference.quantized import Int4Linear, Int8Linear, choose_kernels, dequantize_int4, quantize

COMPILED = choose_kernels(compiled=True, onednn=True)
FALLBACK = choose_kernels(compiled=False, onednn=False)
FALLBACK_ONEDNN = choose_kernels(compiled=False, onednn=True)


def reference(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weights the stored form stands for."""
    if "q4" in tensors:
        return dequantize_int4(tensors["q4"], tensors["scales"], tensors["lows"])
    return tensors["values"].float() * tensors["scales"][:, None]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as the int8 decode kernel sees it: each row rounded to int8 steps of max|row| / 127."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-30)
    return (x / scale).round().clamp(-127, 127) * scale


def test_the_kernels_build_on_an_x86_machine_with_a_compiler():
    """CI and the image have g++: the compiled kernels must be there, not silently the fallback."""
    if platform.machine() != "x86_64" or not shutil.which("g++") or not kernels.cpu_supported():
        pytest.skip("the compiled kernels are for x86 CPUs with AVX2 and a C++ compiler")
    assert kernels.available()
    assert quantized.kernel_plan()["int8 decode"] == "qwenbox"


@pytest.mark.parametrize("bits", [8, 4])
# odd row counts; int4 groups of 32 with a last half vector (96), 64 (192), 128 (256), a lone group of 32,
# and 9 groups of 128 (1152): the batch tile's lows taken 8 groups a vector plus a last one
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
        # the products quantize the activations too: 8 bits per row (decode, int4 prompts), 7 (int8 prompts)
        assert relative_error(got, want) < 2e-2, rows
        if rows <= quantized.DECODE_ROWS or bits == 4:  # exactly the integer product of int8 rows, rescaled
            assert relative_error(got, int8_rows(x) @ w.T + (b if bias else 0)) < 1e-5, rows


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
    assert relative_error(got, int8_rows(x.reshape(6, 45)).reshape(2, 3, 45) @ reference(tensors).T) < 1e-5
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def int8_quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 decode kernel's own rounding of each row, in the same float32 steps (scale =
    max|row| / 127, times 1 / scale, to nearest even): the int8 values as int64, and the scales."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x * (1 / scale)).round().clamp(-127, 127).to(torch.int64), scale


# K with a tail of 1..31 inputs past whole steps of 32 (45, 1552 + 17), fewer than 32 (17), one step
# (32), rows short (<= 2048: prefetched as one run) and long (2087, 2112); N odd (the last weight row alone)
@pytest.mark.parametrize("shape", [(37, 45), (33, 96), (16, 32), (3, 17), (35, 1569), (19, 2087), (8, 2112)])
def test_int8_batch_tile_gives_each_row_what_it_gets_alone(shape):
    """3-4 rows decoding together go through the batch tile (`int8q_tile_batch2`: rows packed per 32
    inputs, the loop in assembly), 5-8 as 4 then the rest, 1-2 rows through `int8q_tile`: each row's
    result must be exactly its result alone (with a bias, to an ulp: the compiler may fuse the
    epilogue's multiply and add in one tile and not in the other), and the exact integer product of
    its int8 row, rescaled."""
    library = kernels.library()
    if library is None:
        pytest.skip("no compiled kernels here")
    torch.manual_seed(shape[0] * shape[1])
    values = torch.randint(-127, 128, shape, dtype=torch.int8)
    values[0] = 127  # the largest pairs: 2 x 127 x 127 in int16 must not saturate
    values[-1, ::2] = -127
    scales = torch.rand(shape[0]) + 0.01
    bias = torch.randn(shape[0])
    for rows in range(1, 10):
        x = torch.randn(rows, shape[1]) * torch.linspace(0.1, 3, rows)[:, None]
        x[0, ::3] = -x[0].abs().amax()  # inputs at -127 x the row's scale
        for b in (None, bias):
            got = library.int8_matmul(x, values, scales, b)
            alone = torch.cat([library.int8_matmul(x[i : i + 1], values, scales, b) for i in range(rows)])
            if b is None:
                assert torch.equal(got, alone), rows
            else:
                torch.testing.assert_close(got, alone, rtol=1e-6, atol=1e-6)
            q, s = int8_quantized_rows(x)
            want = (q @ values.to(torch.int64).T).float() * s * scales + (0 if b is None else b)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("plan", [FALLBACK, FALLBACK_ONEDNN], ids=["no-kernels", "no-kernels-onednn"])
@pytest.mark.parametrize("bits", [8, 4])
def test_fallback_kernels_match_the_same_reference(plan, bits, monkeypatch):
    """Without a compiler the layers use PyTorch's weight-only kernels on bf16 rows: same answers
    to within bf16 rounding."""
    monkeypatch.setattr(quantized, "kernel_plan", lambda: plan)
    torch.manual_seed(2)
    weight = torch.randn(96, 256)
    tensors = quantize(bits, weight)
    layer = quantized.from_quantized(tensors, torch.randn(96))
    assert not hasattr(layer, "q4")  # packed for PyTorch's kernel, not kept for the compiled one
    for rows in (1, 4, 9, 40):
        x = torch.randn(rows, 256)
        want = x @ reference(tensors).T + layer.bias
        assert relative_error(layer(x), want) < 2e-2, rows


def test_int4_needs_a_group_the_kernels_take():
    with pytest.raises(ValueError):
        Int4Linear(torch.randn(20, 64), None)  # 20 outputs: not a multiple of 16
    assert isinstance(quantized.from_quantized(quantize(4, torch.randn(20, 64)), None), Int8Linear)


def test_int4_kernel_does_not_saturate_at_the_largest_values(monkeypatch):
    """Every 4-bit value 15 and every activation at +-127 of its row's scale: the integer sums of a
    group of 128 reach 4 x 2 x 15 x 127 = 15240 in int16, which must not wrap."""
    if not kernels.available():
        pytest.skip("no compiled kernels here")
    monkeypatch.setattr(quantized, "kernel_plan", lambda: COMPILED)
    weight = torch.full((32, 512), 2.0)
    weight[:, ::128] = -1.0  # one low per group: the rest of the group quantizes to q = 15
    tensors = quantize(4, weight)
    assert int((tensors["q4"] >> 4).amin()) == 15
    layer = quantized.from_quantized(tensors, None)
    for x in (torch.full((1, 512), 3.0), torch.full((3, 512), -3.0)):
        want = x @ reference(tensors).T
        assert relative_error(layer(x), want) < 1e-5
