"""`python -m service`: serve the chat app with gunicorn, the one command every entry point runs.

`invoke serve` and the container's CMD both run this, so the production server is defined once
(gunicorn runs in this process, with the command line `--print-command` shows).
One worker process holds the model (a second would load a second copy); its threads carry the
connections, so health checks and streams are served while the engine works.
"""

from __future__ import annotations

import os
import shutil
import sys

from .config import Settings, SettingsError, settings_table
from .inference import startup


def gunicorn_argv(settings: Settings) -> list[str]:
    """The gunicorn command line for these settings."""
    return [
        "gunicorn",
        "--bind",
        f"{settings.host}:{settings.port}",
        "--workers",
        "1",
        "--worker-class",
        # gthread, answering gunicorn's own errors (414 request line, 431 headers) in JSON
        "service.web.gunicorn_worker.JsonErrorWorker",
        "--threads",
        str(settings.web_threads),
        # The worker's heartbeat runs on its main thread, so long generations don't trip this;
        # it only catches a worker that hangs outright.
        "--timeout",
        "120",
        "--graceful-timeout",
        "10",
        "--keep-alive",
        "5",
        "--no-control-socket",
        "--access-logfile",
        "-",
        "--log-level",
        settings.log_level,
        "service.web:create_app()",
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(
            "usage: python -m service [--print-command]\n\n"
            "Serves the qwen-box chat service with gunicorn. Settings (environment variables):\n"
        )
        print(settings_table())
        return 0
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    argv_ = gunicorn_argv(settings)
    if args and args[0] == "--print-command":
        print(" ".join(argv_))
        return 0
    # The kernel starts reading the weights (and torch's libraries) now, while gunicorn, Flask and
    # torch import: from a cold disk that read is most of a start (service/inference/startup.py).
    startup.prefetch(settings.model_id)
    try:
        from gunicorn.app.wsgiapp import WSGIApplication
    except ImportError:
        print("error: gunicorn is not installed (pip install -e .)", file=sys.stderr)
        return 2
    # gunicorn runs in this process, as its own script would with these arguments (exec'ing that
    # script started a second interpreter and imported gunicorn and the settings again: 0.2 s of a
    # start). argv[0] is the script, which gunicorn re-executes on a USR2 upgrade.
    beside = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    sys.argv = [beside if os.path.exists(beside) else shutil.which("gunicorn") or "gunicorn", *argv_[1:]]
    WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
