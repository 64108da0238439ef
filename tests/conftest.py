"""Shared fixtures: tiny real models built on the spot, engines, apps, and a live gunicorn server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from service.config import Settings
from service.dev.tiny_models import build_tiny_model
from service.inference.backend import TransformersBackend
from service.inference.engine import Engine
from service.web import create_app
from tests.scripted import ScriptedBackend

ROOT = Path(__file__).resolve().parent.parent


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


def ready_engine(backend, queue_size: int = 8) -> Engine:
    engine = Engine(lambda: backend, queue_size=queue_size).start()
    assert engine.wait_ready(30), engine.error
    return engine


@pytest.fixture(scope="session")
def engine(tiny_backend: TransformersBackend) -> Engine:
    return ready_engine(tiny_backend)


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(model_id=str(tiny_model_dir), log_level="warning", data_dir=str(tmp_path / "data"))


@pytest.fixture
def client(settings: Settings, engine: Engine):
    return create_app(settings, engine=engine).test_client()


@pytest.fixture
def scripted(tiny_backend: TransformersBackend):
    """Make a ready engine whose model says `script` (optionally slowly)."""

    def make(script: str = "Hello!", delay: float = 0.0, queue_size: int = 8) -> Engine:
        return ready_engine(
            ScriptedBackend(tiny_backend.tokenizer, script, delay=delay), queue_size=queue_size
        )

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, log, grace: float = 15) -> None:
    """Terminate a test's server, kill it if it lingers, and close its log."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


class LiveServer:
    """`python -m service` (the real gunicorn command) on a loopback port; `with` it to wait until
    healthy and stop it afterwards."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": str(log_path.parent / f"data-{self.port}"),
            "LOG_LEVEL": "warning",
            "RATE_LIMIT": "1000/minute",
            **env,
        }
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                r = requests.get(self.url + "/api/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        stop_process(self.process, self._log)

    def __enter__(self) -> LiveServer:
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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
