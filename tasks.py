"""Invoke entry points: `invoke --list` shows them, `invoke --help TASK` explains one.

Thin on purpose: each task wires a command line to the package; the logic lives in `service/`.
"""

from __future__ import annotations

import sys

from invoke import Context, task


@task(help={"model": "hub id or local folder (sets MODEL_ID; default: the MODEL_ID setting)",
            "port": "port (sets PORT; default 8000)",
            "host": "address (sets HOST; default 127.0.0.1, this machine only)"})
def serve(c: Context, model: str = "", port: int = 0, host: str = "") -> None:
    """Run the chat service natively with gunicorn (no Docker): the same command the image runs."""
    env = {}
    if model:
        env["MODEL_ID"] = model
    if port:
        env["PORT"] = str(port)
    if host:
        env["HOST"] = host
    c.run(f"{sys.executable} -m service", env=env, pty=False)


@task(help={"k": "only tests matching this expression (pytest -k)",
            "browser": "include the headless-browser tests (default: yes)"})
def test(c: Context, k: str = "", browser: bool = True) -> None:
    """Run the test suite (the README's test command runs this too)."""
    args = ["-q"]
    if k:
        args += ["-k", repr(k)]
    if not browser:
        args += ["-m", "'not browser'"]
    c.run(f"{sys.executable} -m pytest {' '.join(args)}", pty=False)
