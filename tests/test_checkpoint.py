"""Pre-quantized checkpoints (service/inference/checkpoint.py): written once from the float model,
they load to the same model as quantizing at load, and a folder that is not what it claims is
refused with a message that says what differs."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from service.inference import checkpoint, quantized
from service.inference.backend import TransformersBackend
from service.inference.checkpoint import CheckpointMismatch
from service.inference.loading import load_model

SENTENCE = "Docker packages an application and everything it needs into one image. The quick brown fox."


@pytest.fixture(scope="module")
def written(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model written pre-quantized at each precision (read-only for the tests: copy to change)."""
    root = tmp_path_factory.mktemp("prequantized")
    for precision in ("int8", "int4"):
        checkpoint.write(str(tiny_model_dir), root / precision, precision)
    return {p: root / p for p in ("int8", "int4")}


@pytest.fixture
def copy_of(written: dict[str, Path], tmp_path: Path):
    def make(precision: str) -> Path:
        return Path(shutil.copytree(written[precision], tmp_path / precision))

    return make


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_prequantized_model_is_the_model_quantized_at_load(tiny_model_dir, written, precision):
    """Same logits, so the same next token at every position and the same greedy continuation."""
    at_load = TransformersBackend(str(tiny_model_dir), dtype=precision)
    ahead = TransformersBackend(str(written[precision]), dtype=precision)
    ids = torch.tensor([at_load.tokenizer(SENTENCE)["input_ids"]])
    assert ahead.tokenizer(SENTENCE)["input_ids"] == ids[0].tolist()  # the tokenizer came along
    with torch.inference_mode():
        want, got = at_load.model(ids).logits, ahead.model(ids).logits
        assert torch.equal(want.argmax(-1), got.argmax(-1))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        greedy = {"max_new_tokens": 12, "do_sample": False}
        assert torch.equal(at_load.model.generate(ids, **greedy), ahead.model.generate(ids, **greedy))


@pytest.mark.usefixtures("float32_activations")  # the lean decoder's fused products (see conftest)
@pytest.mark.parametrize("precision,weights", [("int8", "values"), ("int4", "q4")])
def test_fused_products_are_the_mapped_file_not_a_copy(written, precision, weights):
    """The decode step's fused q/k/v and gate/up products read the checkpoint's mapped pages: each
    group's rows are stored one after another, so fusing them at load copies nothing (a copy added two
    thirds of the model to resident memory: 2.58 GiB at the peak for the 1.5B int8, 1.78 without)."""
    from service.inference import kernels

    if not kernels.available():
        pytest.skip("no compiled kernels here: the fallback packs its own copy")
    backend = TransformersBackend(str(written[precision]), dtype=precision)
    assert backend.decoder is not None
    size = (written[precision] / f"model.{precision}.safetensors").stat().st_size
    for layer in backend.model.model.layers:
        for group in (
            [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
            [layer.mlp.gate_proj, layer.mlp.up_proj],
        ):
            parts = [getattr(m, weights) for m in group]
            assert all(p.untyped_storage().nbytes() == size for p in parts)  # the file's mapping
            for before, after in itertools.pairwise(parts):
                assert after.data_ptr() == before.data_ptr() + before.nbytes


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_folder_is_complete_and_holds_no_float_weights(written, tiny_model_dir, precision):
    folder = written[precision]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "tokenizer.json", "generation_config.json", "quantized.json"} <= names
    assert [n for n in names if n.endswith(".safetensors")] == [f"model.{precision}.safetensors"]
    manifest = json.loads((folder / "quantized.json").read_text())
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION and manifest["precision"] == precision
    assert manifest["source"]["model"] == str(tiny_model_dir)
    assert set(manifest["source"]["files"]) == {"model.safetensors"}
    assert manifest["written_with"]["torch"] == torch.__version__
    float_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert manifest["weights"]["bytes"] == (folder / f"model.{precision}.safetensors").stat().st_size
    # int8: a byte and 1/16 a weight; int4: 5/8 of a byte a weight (groups of 32), but the tiny
    # model is mostly its int8 token table
    assert manifest["weights"]["bytes"] < float_bytes * 0.6


class FloatMatrices(TorchDispatchMode):
    """Records every op that makes a float tensor as large as a weight matrix (in memory: the empty
    network on the meta device holds none)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and not t.is_meta
                and t.numel() >= self.numel
            ):
                self.seen.append(f"{func} {tuple(t.shape)} {t.dtype}")
        return out


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_loading_never_makes_a_float_matrix_nor_quantizes_again(written, monkeypatch, precision):
    def refuse(*args, **kwargs):
        raise AssertionError("quantized again at load")

    for module in (quantized, checkpoint):
        monkeypatch.setattr(module, "quantize", refuse)
        monkeypatch.setattr(module, "quantize_blocks", refuse)
    config = json.loads((written[precision] / "config.json").read_text())
    smallest = (
        config["hidden_size"]
        * config["num_key_value_heads"]
        * config["hidden_size"]
        // config["num_attention_heads"]
    )
    with FloatMatrices(smallest) as seen:
        model = load_model(str(written[precision]), precision)
    assert seen.seen == []
    assert not any(p.is_floating_point() and p.numel() >= smallest for p in model.parameters())


def test_a_newer_format_version_is_refused(copy_of):
    folder = copy_of("int8")
    manifest = json.loads((folder / "quantized.json").read_text())
    manifest["format_version"] = checkpoint.FORMAT_VERSION + 1
    (folder / "quantized.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointMismatch,
        match=rf"format version {checkpoint.FORMAT_VERSION + 1}; .* reads "
        rf"version {checkpoint.FORMAT_VERSION}",
    ):
        load_model(str(folder), "int8")


@pytest.mark.parametrize(
    ("stored", "asked"), [("int4", "int8"), ("int8", "int4"), ("int8", "bfloat16"), ("int4", "float32")]
)
def test_another_precision_is_refused_naming_the_one_the_folder_holds(written, stored, asked):
    with pytest.raises(
        CheckpointMismatch, match=rf"pre-quantized to {stored}, but DTYPE={asked} .*DTYPE={stored}"
    ):
        load_model(str(written[stored]), asked)


def test_a_changed_config_is_refused(copy_of):
    folder = copy_of("int4")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointMismatch, match=r"config.json is not the config these weights were quantized with"
    ):
        load_model(str(folder), "int4")


def test_a_truncated_weights_file_is_refused(copy_of):
    folder = copy_of("int8")
    weights = folder / "model.int8.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(
        CheckpointMismatch, match=rf"{size - 100:,} bytes, its manifest says {size:,}: truncated"
    ):
        load_model(str(folder), "int8")


def test_a_weights_file_that_disagrees_with_its_header_is_refused(copy_of):
    """Same length as the manifest says, but not the file it describes (its header's sizes differ)."""
    folder = copy_of("int8")
    weights = folder / "model.int8.safetensors"
    data = weights.read_bytes()
    assert data.count(b'"precision":"int8"') == 1
    weights.write_bytes(data.replace(b'"precision":"int8"', b'"precision":"int4"'))
    with pytest.raises(CheckpointMismatch, match="does not hold what its manifest describes"):
        load_model(str(folder), "int8")


def test_the_command_writes_a_folder_and_refuses_a_prequantized_source(
    tiny_model_dir, written, tmp_path, capsys
):
    dest = tmp_path / "out"
    assert (
        checkpoint.main([str(tiny_model_dir), str(dest), "--precision", "int4", "--model-id", "tiny/qwen"])
        == 0
    )
    assert "DTYPE=int4" in capsys.readouterr().out
    assert json.loads((dest / "quantized.json").read_text())["source"]["model"] == "tiny/qwen"
    assert checkpoint.main([str(written["int8"]), str(tmp_path / "again")]) == 1
    assert "already pre-quantized" in capsys.readouterr().err


def _rows_v1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Format version 1's int8 form: one float32 scale per row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def _quantize_v1(bits: int, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Format version 1's stored form: int8 per row, int4 in bf16 groups of 128."""
    if bits == 4 and weight.shape[0] % 16 == 0 and weight.shape[1] % 128 == 0:
        q4, scales, lows = quantized.quantize_int4_groups(weight.detach(), 128)
        return {"q4": q4, "scales": scales.bfloat16(), "lows": lows.bfloat16()}
    values, scales = _rows_v1(weight.detach())
    return {"values": values, "scales": scales}


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_version_1_checkpoint_loads_as_the_same_weights(tiny_model_dir, tmp_path, monkeypatch, precision):
    """Folders written before the block scales (one float32 scale per int8 row, int4 groups of 128 in
    bf16) still load: each row's scale, each group's scale and low, repeated over its blocks of 32."""
    folder = tmp_path / "v1"
    with monkeypatch.context() as old:
        old.setattr(checkpoint, "FORMAT_VERSION", 1)
        old.setattr(checkpoint, "quantize", _quantize_v1)
        old.setattr(checkpoint, "quantize_blocks", _rows_v1)
        checkpoint.write(str(tiny_model_dir), folder, precision)
    assert json.loads((folder / "quantized.json").read_text())["format_version"] == 1
    stored = dict(checkpoint.map_safetensors(folder / f"model.{precision}.safetensors"))
    model = load_model(str(folder), precision)
    layer = model.model.layers[0].mlp.down_proj
    name = "model.layers.0.mlp.down_proj"
    if precision == "int8":
        want = stored[f"{name}.values"].float() * stored[f"{name}.scales"].half().float()[:, None]
        assert torch.equal(quantized.dequantize_int8(layer.values, layer.scales), want)
    else:
        want = quantized.dequantize_int4(
            stored[f"{name}.q4"], stored[f"{name}.scales"], stored[f"{name}.lows"]
        )
        assert layer.group == 32
        assert torch.equal(quantized.dequantize_int4(layer.q4, layer.scales, layer.lows), want)
    table = model.get_input_embeddings()
    want_table = (
        stored["model.embed_tokens.values"].float()
        * stored["model.embed_tokens.scales"].half().float()[:, None]
    )
    assert torch.equal(table(torch.arange(5)).float(), want_table[:5])
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])).logits).all()
