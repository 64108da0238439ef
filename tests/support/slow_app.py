"""The production app behind the real gunicorn, but with a scripted model that writes one token every
`SCRIPT_DELAY` seconds (default 0.05) and never runs out of words: a generation lasts as long as its
max_tokens says, on a loaded machine as on an idle one. Served by `LiveServer(..., app=SLOW_APP)`.
With `LOAD_UNTIL`, a file's path, the model "loads" until that file exists (health answers 503
meanwhile), as a real instance does while it reads its weights: the test decides when loading ends,
so it neither waits out a fixed delay nor races one on a slow machine."""

from __future__ import annotations

import os
import time

from flask import Flask

from service.config import Settings
from service.inference.engine import Engine
from service.web import create_app as create_production_app
from tests.support.engines import ScriptedBackend, ready_engine

SLOW_APP = "tests.support.slow_app:create_app()"


def create_app() -> Flask:
    from transformers import AutoTokenizer

    settings = Settings.from_env()
    tokenizer = AutoTokenizer.from_pretrained(settings.model_id)
    backend = ScriptedBackend(
        tokenizer,
        "word " * 5000,
        delay=float(os.environ.get("SCRIPT_DELAY", "0.05")),
        context_length=settings.context_tokens,
        max_batch=settings.max_batch,
    )
    gate = os.environ.get("LOAD_UNTIL")
    if gate:

        def load() -> ScriptedBackend:
            while not os.path.exists(gate):
                time.sleep(0.05)
            return backend

        engine = Engine(load, queue_size=settings.queue_size).start()
    else:
        engine = ready_engine(backend, queue_size=settings.queue_size)
    return create_production_app(settings, engine=engine)
