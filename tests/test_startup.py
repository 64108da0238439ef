"""What a start does before torch and Transformers import (service/inference/startup.py), and the
mapped reading of a pre-quantized checkpoint (loading.map_safetensors).

The import-structure cache must give Transformers exactly what its own scan gives (else a model
class would be missing or claim the wrong backends), see a changed model file, and never break an
import when its folder cannot be written; those run in fresh interpreters, since this test process
imported Transformers long ago.
"""

from __future__ import annotations

import gc
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.inference import startup
from service.inference.loading import map_safetensors, read_safetensors

ROOT = Path(__file__).resolve().parent.parent


def fresh(code: str, cache_dir: Path) -> dict:
    """`code` after installing the cache in `cache_dir`, in a new interpreter; it prints JSON last."""
    prelude = (
        "import json\nfrom pathlib import Path\nfrom service.inference import startup\n"
        f"assert startup.install_import_cache(Path({str(cache_dir)!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SCAN_BOTH = """
import transformers
import transformers.utils.import_utils as iu
from pathlib import Path
models = str(Path(transformers.__file__).parent / "models")
kept = iu.create_import_structure_from_path(models)
scanned = iu.create_import_structure_from_path.scan.__wrapped__(models)  # Transformers' scan, uncached
from service.inference.startup import _encode
print(json.dumps({"same": _encode(kept) == _encode(scanned) and kept == scanned,
                  "qwen2": sorted(kept["qwen2"][frozenset({"torch"})]["modeling_qwen2"]),
                  "patched": iu.create_import_structure_from_path.__module__}))
"""


def test_the_kept_import_structure_is_transformers_own_scan(tmp_path: Path) -> None:
    first = fresh(SCAN_BOTH, tmp_path)  # scans, writes the file
    files = list(tmp_path.glob("transformers-imports-*.json"))
    assert len(files) == 1 and files[0].stat().st_size > 10_000
    second = fresh(SCAN_BOTH, tmp_path)  # reads it back
    for result in (first, second):
        assert result["same"], "the kept structure differs from Transformers' scan"
        assert result["patched"] == "service.inference.startup"
        assert "Qwen2ForCausalLM" in result["qwen2"]
    # and a start with it still finds the model classes through the lazy modules
    found = fresh(
        "from transformers import AutoModelForCausalLM, Qwen2ForCausalLM, AutoTokenizer\n"
        "print(json.dumps({'cls': Qwen2ForCausalLM.__name__}))",
        tmp_path,
    )
    assert found == {"cls": "Qwen2ForCausalLM"}


def test_a_kept_structure_with_another_fingerprint_is_scanned_again(tmp_path: Path) -> None:
    fresh("import transformers\nprint('{}')", tmp_path)
    (file,) = tmp_path.glob("transformers-imports-*.json")
    stored = json.loads(file.read_text())
    stored["key"]["mtime_ns"] += 1  # as if a model file had been edited since
    stored["structure"] = [["dir", "qwen2", []]]  # and what it holds no longer true
    file.write_text(json.dumps(stored))
    result = fresh(SCAN_BOTH, tmp_path)
    assert result["same"] and "Qwen2ForCausalLM" in result["qwen2"]
    assert json.loads(file.read_text())["key"]["mtime_ns"] == stored["key"]["mtime_ns"] - 1  # rewritten


def test_an_unwritable_cache_folder_only_means_scanning(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    result = fresh(SCAN_BOTH, blocker / "cache")
    assert result["same"] and "Qwen2ForCausalLM" in result["qwen2"]


def test_installing_after_transformers_is_imported_does_nothing() -> None:
    import transformers  # noqa: F401  (imported by this test process long ago, now for sure)

    assert startup.install_import_cache(Path("/nonexistent")) is False


def test_gc_is_paused_until_resumed_then_the_start_is_frozen() -> None:
    if not gc.isenabled():
        pytest.skip("the collector is already off in this process")
    frozen = gc.get_freeze_count()
    startup.pause_gc()
    try:
        assert not gc.isenabled()
        startup.pause_gc()  # twice: still one pause
    finally:
        startup.resume_gc()
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen
    startup.resume_gc()  # not paused: nothing
    assert gc.isenabled()
    gc.unfreeze()


def test_a_collector_someone_else_turned_off_stays_off() -> None:
    gc.disable()
    try:
        startup.pause_gc()
        startup.resume_gc()
        assert not gc.isenabled()
    finally:
        gc.enable()


def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = {torch.int8: "I8", torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    raw_header = json.dumps(header).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    path.write_bytes(struct.pack("<Q", len(raw_header)) + raw_header + b"".join(blobs))


def test_mapped_tensors_equal_the_read_ones_misaligned_and_empty_included(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.values": torch.randint(-127, 128, (3, 5), dtype=torch.int8, generator=g),  # 15 bytes: misaligns
        "a.scales": torch.rand(3, generator=g),
        "b.weight": torch.rand(4, 2, generator=g).to(torch.bfloat16),
        "c.empty": torch.empty(0, 4, dtype=torch.float32),
    }
    _safetensors(file, tensors)
    mapped = dict(map_safetensors(file))
    read = dict(read_safetensors(file))
    assert mapped.keys() == tensors.keys() == read.keys()
    for name, tensor in tensors.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name
        assert torch.equal(read[name], tensor), name
    mapped["a.scales"].mul_(2)  # private mapping: a write stays in this process, never the file
    assert torch.equal(dict(map_safetensors(file))["a.scales"], tensors["a.scales"])


def test_a_truncated_file_is_refused_when_mapped(tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    _safetensors(file, {"x.values": torch.ones(64, dtype=torch.int8), "x.scales": torch.ones(8)})
    file.write_bytes(file.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        dict(map_safetensors(file))


def test_prefetch_reads_ahead_only_a_prequantized_folder(tmp_path: Path) -> None:
    assert startup.prefetch(str(tmp_path)) is None  # no manifest: a float model, not read ahead
    assert startup.prefetch("Qwen/Qwen2.5-1.5B-Instruct") is None  # a hub id
    (tmp_path / "quantized.json").write_text(json.dumps({"weights": {"file": "model.int8.safetensors"}}))
    (tmp_path / "model.int8.safetensors").write_bytes(b"\0" * 4096)
    thread = startup.prefetch(str(tmp_path))
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    assert startup.prefetch(str(tmp_path)) is None  # once per folder and process
    other = tmp_path / "other"
    other.mkdir()
    (other / "quantized.json").write_text(json.dumps({"weights": {"file": "gone.safetensors"}}))
    thread = startup.prefetch(str(other))  # a missing weights file: the thread just ends
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()


CONFIG_BOTH = """
import sys
import transformers.modeling_utils  # what a start imports: torch._dynamo and its config modules
import torch.utils._config_module as cm
kept_scan = cm.get_assignments_with_compile_ignored_comments
mods = [m for m in list(sys.modules.values()) if hasattr(m, "__file__")]
mods = [m for m in mods if isinstance(getattr(m, "_config", None), dict)]
print(json.dumps({"patched": kept_scan.__module__, "modules": sorted(m.__name__ for m in mods),
                  "same": all(kept_scan(m) == kept_scan.scan(m) for m in mods),
                  "some": sum(len(kept_scan(m)) for m in mods)}))
"""


def test_torch_config_comments_kept_are_torch_own_scan(tmp_path: Path) -> None:
    first = fresh(CONFIG_BOTH, tmp_path)  # scans, writes the file
    kept = json.loads((tmp_path / "torch-config-ignored.json").read_text())
    second = fresh(CONFIG_BOTH, tmp_path)  # reads it back
    for result in (first, second):
        assert result["patched"] == "service.inference.startup" and result["same"], result
        assert "torch._inductor.config" in result["modules"] and result["some"] > 10
    assert len(kept) >= len(first["modules"]) and all(entry["names"] is not None for entry in kept.values())


def test_a_config_file_changed_since_is_scanned_again(tmp_path: Path) -> None:
    import types

    source = tmp_path / "fake_config.py"
    source.write_text("# @compile_ignored: why\nquiet = 1\nloud = 2\n")
    module = types.ModuleType("fake_config")
    module.__file__ = str(source)
    calls: list[str] = []

    def scan(m: types.ModuleType) -> set[str]:
        calls.append(m.__name__)
        return {"quiet"} if "loud" in Path(m.__file__).read_text() else set()

    assert startup.cached_ignored(scan, tmp_path)(module) == {"quiet"}
    assert startup.cached_ignored(scan, tmp_path)(module) == {"quiet"} and len(calls) == 1  # kept
    source.write_text("quiet = 1\n")  # another size
    assert startup.cached_ignored(scan, tmp_path)(module) == set() and len(calls) == 2


def test_two_installations_of_one_version_keep_an_answer_each(tmp_path: Path) -> None:
    """Two environments (say, a checkout's and CI's) with the same Transformers version: each keeps
    its own answer, so starting one does not make the other scan again."""
    calls: list[str] = []

    def scan(path: str) -> dict:
        calls.append(path)
        return {"qwen2": {frozenset({"torch"}): {"modeling_qwen2": {path}}}}

    folders = []
    for name in ("a", "b"):
        models = tmp_path / name / "transformers" / "models"
        models.mkdir(parents=True)
        (models.parent / "__init__.py").write_text('__version__ = "9.9.9"\n')
        (models / "__init__.py").write_text("")
        folders.append(models)
    for _ in range(2):  # alternating starts
        for models in folders:
            answer = startup.cached_scan(scan, tmp_path / "cache")(str(models))  # a fresh process's cache
            assert answer["qwen2"][frozenset({"torch"})]["modeling_qwen2"] == {str(models)}
    assert calls == [str(f) for f in folders]  # each scanned once, then read back
    assert len(list((tmp_path / "cache").glob("transformers-imports-9.9.9-*.json"))) == 2
