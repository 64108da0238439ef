"""Offering several models: the catalog, /api/models, switching, and unloading for memory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.catalog import CATALOG, lookup
from service.config import Settings
from service.dev.tiny_models import build_tiny_llama, build_tiny_model
from service.inference.memory import weights_bytes
from service.models import ModelManager
from service.web import create_app


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def wait_loaded(client, model_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = client.get("/api/models").json
        entry = next(m for m in models["data"] if m["id"] == model_id)
        if entry["state"] in ("loaded", "failed"):
            return models
        time.sleep(0.05)
    raise TimeoutError(model_id)


def two_model_app(tiny_model_dir, llama_dir, tmp_path, **overrides):
    settings = Settings(
        model_id=str(tiny_model_dir),
        models=f"{tiny_model_dir},{llama_dir}",
        data_dir=str(tmp_path),
        log_level="warning",
        **overrides,
    )
    app = create_app(settings)
    client = app.test_client()
    wait_loaded(client, tiny_model_dir.name)
    return app, client


def test_catalog_has_the_promised_models_with_memory_figures():
    wanted = [
        "Qwen/Qwen2.5-0.5B-Instruct",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "Qwen/Qwen2.5-3B-Instruct",
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "microsoft/Phi-3-mini-4k-instruct",
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "HuggingFaceTB/SmolVLM-500M-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
    ]
    assert [e.hub_id for e in CATALOG] == wanted
    qwen = lookup("qwen/qwen2.5-1.5b-instruct")
    assert qwen.memory_gb("float32") > qwen.memory_gb("bfloat16") > qwen.memory_gb("int8")
    assert 3.0 < qwen.memory_gb("bfloat16") < 4.5
    assert lookup("/models/Qwen2.5-1.5B-Instruct") is qwen  # a local copy is recognised by name
    assert lookup("someone/else") is None
    small, large = lookup("HuggingFaceTB/SmolVLM-500M-Instruct"), lookup("Qwen/Qwen2.5-VL-7B-Instruct")
    assert small.accepts_images and large.accepts_images and not qwen.accepts_images
    # the vision encoder stays float32 at int8: a quantized vision model is not simply params/2
    assert small.memory_gb("int8") == round((0.42 + 0.09 * 4) + 0.6, 1)
    assert small.memory_gb("int8") <= 4 - 1 - 1.5  # a B2s: 4 GiB less the OS, with room to spare


def test_weights_size_is_read_from_the_folder(tiny_model_dir):
    on_disk = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert weights_bytes(str(tiny_model_dir), "bfloat16") == on_disk
    assert weights_bytes(str(tiny_model_dir), "float32") == on_disk * 2
    assert weights_bytes("Qwen/Qwen2.5-1.5B-Instruct", "bfloat16") == int(1.54e9 * 2)


def test_switch_between_two_architectures(tiny_model_dir, llama_dir, tmp_path):
    app, client = two_model_app(tiny_model_dir, llama_dir, tmp_path)
    qwen, llama = tiny_model_dir.name, llama_dir.name
    listing = client.get("/api/models").json
    assert listing["active"] == qwen
    assert {m["id"]: m["state"] for m in listing["data"]} == {qwen: "loaded", llama: "available"}
    assert [m["id"] for m in client.get("/v1/models").json["data"]] == [qwen, llama]

    r = client.post("/api/chat", json={"message": "hi", "model": llama})
    assert r.status_code == 503 and "not loaded" in r.json["error"]["message"]

    started = time.perf_counter()
    r = client.post("/api/models/active", json={"model": llama})
    assert r.status_code == 202 and r.json["state"] == "loading"
    # The current model keeps answering while the other loads.
    assert client.post("/api/chat", json={"message": "still there?", "max_tokens": 3}).status_code == 200
    listing = wait_loaded(client, llama)
    switch_s = time.perf_counter() - started
    assert listing["active"] == llama and switch_s < 30
    r = client.post("/api/chat", json={"message": "hi", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json["model"] == llama
    assert client.get("/api/health").json["model_id"] == llama
    # Memory allows both, so the first stays loaded and switching back is immediate.
    assert client.post("/api/models/active", json={"model": qwen}).status_code == 200
    r = client.post(
        "/v1/chat/completions",
        json={"model": llama, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200 and r.json["model"] == llama
    app.extensions["models"].close()


def test_a_model_that_does_not_fit_beside_the_other_replaces_it(tmp_path_factory, tmp_path):
    big_qwen = build_tiny_model(tmp_path_factory.mktemp("bigger-qwen"), hidden_size=256, layers=4)
    big_llama = build_tiny_llama(tmp_path_factory.mktemp("bigger-llama"), hidden_size=256, layers=4)
    sizes = [weights_bytes(str(d), Settings().dtype) for d in (big_qwen, big_llama)]
    budget_mb = max(sizes) // 2**20 + 1  # room for either alone, not for both
    assert sum(sizes) > budget_mb * 2**20
    app, client = two_model_app(big_qwen, big_llama, tmp_path, memory_budget_mb=budget_mb)
    models = app.extensions["models"]
    old_engine = models.engine()
    assert client.post("/api/models/active", json={"model": big_llama.name}).status_code == 202
    assert old_engine.state == "unloaded"  # unloaded before the new one loads
    wait_loaded(client, big_llama.name)
    states = {m["id"]: m["state"] for m in client.get("/api/models").json["data"]}
    assert states == {big_qwen.name: "available", big_llama.name: "loaded"}
    assert client.post("/api/chat", json={"message": "hi", "max_tokens": 2}).status_code == 200
    models.close()


def test_unknown_models_are_refused_with_the_offered_list(tiny_model_dir, llama_dir, tmp_path):
    app, client = two_model_app(tiny_model_dir, llama_dir, tmp_path)
    for r in (
        client.post("/api/models/active", json={"model": "gpt-4"}),
        client.post("/api/chat", json={"message": "hi", "model": "gpt-4"}),
    ):
        assert r.status_code == 400
        message = r.json["error"]["message"]
        assert tiny_model_dir.name in message and llama_dir.name in message
        assert r.json["error"]["code"] == "model_not_found"
    assert client.post("/api/models/active", json={"name": "x"}).status_code == 422
    assert client.post("/api/models/active", data="{", content_type="application/json").status_code == 400
    app.extensions["models"].close()


def test_a_model_that_fails_to_load_is_reported_and_the_current_one_stays(tiny_model_dir, tmp_path):
    missing = tmp_path / "missing-model"
    missing.mkdir()
    app, client = two_model_app(tiny_model_dir, missing, tmp_path / "d")
    client.post("/api/models/active", json={"model": missing.name})
    listing = wait_loaded(client, missing.name)
    entry = next(m for m in listing["data"] if m["id"] == missing.name)
    assert entry["state"] == "failed" and entry["error"]
    assert listing["active"] == tiny_model_dir.name
    assert client.get("/api/health").status_code == 200
    app.extensions["models"].close()


class FlippingEngine:
    """An engine that is still loading the first time its state is read and loaded from then on: the
    moment a model finishes loading between two reads of one listing."""

    error = None

    def __init__(self) -> None:
        self.reads = 0

    def start(self) -> FlippingEngine:
        return self

    @property
    def state(self) -> str:
        self.reads += 1
        return "loading" if self.reads == 1 else "ok"

    def close(self) -> None:
        pass


def test_a_listing_names_one_active_model_even_while_the_other_finishes_loading():
    engines = {"first": FlippingEngine(), "second": FlippingEngine()}
    engines["first"].reads = 1  # loaded already
    manager = ModelManager(["first", "second"], "first", engines.__getitem__, budget_bytes=2**40).start()
    assert manager.select("second").id == "second"  # starts it loading; its state has not been read yet
    active, data = manager.describe()  # "second" turns loaded during this call
    states = {m["id"]: (m["state"], m["active"]) for m in data}
    assert states["second"] == ("loading", False) and (active, states["first"]) == ("first", ("loaded", True))
    active, data = manager.describe()
    assert active == "second" and {m["id"]: m["active"] for m in data} == {"first": False, "second": True}
