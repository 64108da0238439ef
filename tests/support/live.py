"""Real processes and ports on loopback: a free port, a polling wait, stopping a test's server, and the
real production server (`python -m service`, i.e. gunicorn) as a context manager."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from service.__main__ import gunicorn_argv
from service.config import Settings
from tests.support.paths import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 30, interval: float = 0.02) -> None:
    """Poll `condition` until it is true; fail the test if it is not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(interval)


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
    healthy and stop it afterwards. With `app`, the same gunicorn command serves that app factory."""

    def __init__(self, env: dict[str, str], log_path: Path, app: str | None = None):
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
        command = [sys.executable, "-m", "service"]
        if app is not None:  # the same gunicorn command line, serving another app factory
            argv = gunicorn_argv(Settings.from_env(full_env))
            command = [sys.executable, "-m", "gunicorn", *argv[1:-1], app]
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            command,
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
            except requests.RequestException:  # not listening yet, or too busy importing to answer in 2 s
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        stop_process(self.process, self._log)

    def kill(self) -> None:
        """SIGKILL gunicorn's master and its worker together, as an instance that crashes or loses
        its machine dies: no graceful shutdown, open connections simply end."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for victim in (pid, *map(int, children)):
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self._log.close()

    def __enter__(self) -> LiveServer:
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
