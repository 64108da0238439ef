"""HAProxy (Debian's package) on loopback as the stand-in for Azure's load balancer in front of several
`LiveServer`s: active health checks on /api/health (a loading instance answers 503 and is kept out),
and on a connection that fails or a server that dies before answering, the request is sent again
to another server (`retry-on conn-failure empty-response` with `option redispatch`). Each response
says which server answered (`X-Served-By`), and `states()` reads HAProxy's own view of its servers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.live import free_port, stop_process, wait_for

CONFIG = """\
global
    stats socket {admin} mode 600 level admin
    tune.bufsize 65536

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout queue 30s
    # A request whose connection to a server fails, or whose server closes without a byte of answer
    # (killed mid-request), is sent again to another server: nothing had reached the client yet.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    option http-buffer-request

frontend qwenbox
    bind 127.0.0.1:{port}
    default_backend instances

backend instances
    balance roundrobin
    option httpchk
    http-check send meth GET uri /api/health ver HTTP/1.1 hdr Host 127.0.0.1
    http-check expect status 200
    default-server inter 300ms fall 2 rise 1
    http-response set-header X-Served-By %s
{servers}
"""


def haproxy_exe() -> str:
    """HAProxy's path; skipped where it is missing, but a failure in CI (which installs it)."""
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is missing in CI (the README's test command installs it)")
        pytest.skip("haproxy not installed (apt-get install haproxy)")
    return path


class HAProxy:
    """`haproxy -db` with servers `name -> port`, its config and log in `workdir`; `stop()` ends it."""

    def __init__(self, servers: dict[str, int], workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = workdir / "admin.sock"
        lines = "\n".join(f"    server {name} 127.0.0.1:{port} check" for name, port in servers.items())
        config = workdir / "haproxy.cfg"
        config.write_text(CONFIG.format(admin=self.admin, port=self.port, servers=lines))
        exe = haproxy_exe()
        checked = subprocess.run([exe, "-c", "-f", str(config)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self._log = open(workdir / "haproxy.log", "wb")
        self.process = subprocess.Popen(
            [exe, "-db", "-f", str(config)], stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for(self._listening, timeout=10)

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _stat(self) -> list[list[str]]:
        """The stats socket's `show stat` CSV rows of the backend (servers and the BACKEND total)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.admin))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
        return [r for r in rows if r[0] == "instances"]

    def states(self) -> dict[str, str]:
        """HAProxy's view of each server: "UP", "DOWN", ..."""
        return {r[1]: r[17].split(" ")[0] for r in self._stat() if r[1] != "BACKEND"}

    def retries(self) -> int:
        """Requests HAProxy sent again (retries on the same server plus redispatches to another)."""
        total = next(r for r in self._stat() if r[1] == "BACKEND")
        return int(total[15] or 0) + int(total[16] or 0)

    def wait_state(self, server: str, state: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.states().get(server) != state:
            assert time.monotonic() < deadline, f"{server} never {state}: {self.states()}"
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process, self._log, grace=5)
