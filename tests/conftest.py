"""Shared fixtures: tiny real models built on the spot, engines, apps, and a live gunicorn server.

Fixtures only; what tests import (helpers, servers, fakes) is in tests/support/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import Settings
from service.dev.tiny_models import build_tiny_model
from service.inference.backend import TransformersBackend
from service.inference.engine import Engine
from service.web import create_app
from tests.support.engines import ready_engine, scripted_engine
from tests.support.image import ImageBuilds, engine_problem
from tests.support.live import LiveServer
from tests.support.postgres import fresh_schema

# The Chromium fixtures (browser, serve, page, phone_page); the fake ARM ones (fake, clients, azure_offline).
pytest_plugins = ["tests.support.browser", "tests.support.azure"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The image tests last: their images build in the background while the rest of the suite runs
    (`image_builds`), so by the end they are built or nearly so."""
    items.sort(key=lambda item: item.get_closest_marker("image") is not None)


@pytest.fixture
def float32_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized models computing in float32 between their products, as on every CPU without AVX-512
    BF16 (where the lean decoder runs): tests of that path force it, so they test it on any CPU. On a
    CPU with BF16 the activations are bf16 and the model's forward runs instead (tested as such)."""
    from service.inference import attention

    monkeypatch.setattr(attention, "fast_bf16_products", lambda: False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2 chat model with a real BPE tokenizer and ChatML template, on disk."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model, but it never emits end-of-turn: generations always run to max_tokens."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-endless"), endless=True)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir: Path) -> TransformersBackend:
    return TransformersBackend(str(tiny_model_dir))


@pytest.fixture(scope="session")
def engine(tiny_backend: TransformersBackend) -> Engine:
    return ready_engine(tiny_backend)


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(model_id=str(tiny_model_dir), log_level="warning", data_dir=str(tmp_path / "data"))


@pytest.fixture(params=["sqlite", "postgresql"])
def history_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each history test twice: "" (SQLite under DATA_DIR, the default) and a postgresql:// URL of a
    fresh schema in the test PostgreSQL (skipped locally when none is set up, a failure in CI)."""
    if request.param == "sqlite":
        yield ""
    else:
        with fresh_schema() as url:
            yield url


@pytest.fixture
def client(settings: Settings, engine: Engine):
    return create_app(settings, engine=engine).test_client()


@pytest.fixture
def scripted(tiny_backend: TransformersBackend):
    """Make a ready engine whose model says `script` (optionally slowly)."""

    def make(script: str = "Hello!", delay: float = 0.0, queue_size: int = 8) -> Engine:
        return scripted_engine(tiny_backend, script, delay=delay, queue_size=queue_size)

    return make


@pytest.fixture(scope="module")
def live_server(endless_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """gunicorn serving the endless tiny model one request at a time, with room for one waiting."""
    with LiveServer(
        {
            "MODEL_ID": str(endless_model_dir),
            "QUEUE_SIZE": "1",
            "MAX_BATCH": "1",
            "CONTEXT_TOKENS": "4096",
            "MAX_TOKENS_LIMIT": "4000",
        },
        tmp_path_factory.mktemp("logs") / "gunicorn.log",
    ) as server:
        yield server


@pytest.fixture(scope="session")
def image_builds(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageBuilds]:
    """The image tests' two images (tests/support/image.py); everything they made is removed at the end."""
    builds = ImageBuilds(tiny_model_dir, tmp_path_factory.mktemp("image"))
    yield builds
    left = builds.close()
    assert not left, f"left behind: {left}"


@pytest.fixture(scope="session", autouse=True)
def _start_image_builds(request: pytest.FixtureRequest) -> None:
    """With the session's first test, start the image builds if image tests are selected and an engine
    answers (without one, those tests skip or, in CI, fail on their own)."""
    if any(item.get_closest_marker("image") for item in request.session.items) and engine_problem() is None:
        request.getfixturevalue("image_builds").start()
