"""The production app behind the real gunicorn, but with a scripted model that writes one token every
`SCRIPT_DELAY` seconds (default 0.05) and never runs out of words: a generation lasts as long as its
max_tokens says, on a loaded machine as on an idle one. Served by `LiveServer(..., app=SLOW_APP)`."""

from __future__ import annotations

import os

from flask import Flask

from service.config import Settings
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
    return create_production_app(settings, engine=ready_engine(backend, queue_size=settings.queue_size))
