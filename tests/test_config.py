"""Settings come from the environment once, with clear errors for values that cannot work."""

from __future__ import annotations

import pytest

from service.__main__ import gunicorn_argv
from service.config import DEFAULT_MODEL_ID, Settings, SettingsError


def test_defaults():
    s = Settings.from_env({})
    assert (s.model_id, s.host, s.port) == (DEFAULT_MODEL_ID, "127.0.0.1", 8000)


def test_values_are_read_and_typed():
    s = Settings.from_env({"MODEL_ID": "/models/qwen", "PORT": " 9001 ", "QUEUE_SIZE": "3", "HOST": ""})
    assert (s.model_id, s.port, s.queue_size, s.host) == ("/models/qwen", 9001, 3, "127.0.0.1")


@pytest.mark.parametrize(
    "env,words",
    [
        ({"PORT": "eighty"}, "PORT must be a whole number"),
        ({"PORT": "70000"}, "PORT must be between"),
        ({"DTYPE": "int3"}, "DTYPE must be one of"),
        ({"QUEUE_SIZE": "0"}, "QUEUE_SIZE must be at least 1"),
        ({"DEFAULT_MAX_TOKENS": "5000"}, "DEFAULT_MAX_TOKENS cannot exceed"),
        ({"CONTEXT_TOKENS": "1000"}, "MAX_TOKENS_LIMIT must be smaller"),
    ],
)
def test_bad_values_name_the_variable(env, words):
    with pytest.raises(SettingsError, match=words):
        Settings.from_env(env)


def test_gunicorn_command_holds_one_worker_with_threads():
    argv = gunicorn_argv(Settings(host="0.0.0.0", port=8080, web_threads=4))
    assert argv[0] == "gunicorn" and argv[-1] == "service.web:create_app()"
    joined = " ".join(argv)
    assert "--bind 0.0.0.0:8080" in joined and "--workers 1" in joined
    assert "--worker-class service.web.gunicorn_worker.JsonErrorWorker" in joined and "--threads 4" in joined


def test_the_app_module_does_not_import_torch():
    """torch and Transformers take seconds to import; the server must answer health checks
    meanwhile, so they load with the model in the background, never at app import."""
    import subprocess
    import sys

    code = "import sys, service.web; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
