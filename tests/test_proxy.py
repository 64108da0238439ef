"""The VM's reverse proxy for real: Caddy (Debian's package, the same 2.6 series as Ubuntu 24.04's) with
the Caddyfile deploy-azure writes, checked by Caddy's own validator and run on loopback in front of the
real `python -m service` with the tiny model.

What only a real proxy shows: a streamed reply is passed on piece by piece while the model is still
generating (not buffered until the end), closing the connection at the client still stops the
generation behind the proxy, and HTTP is redirected to HTTPS with a certificate for the VM's name.
Everything listens on 127.0.0.1; no certificate authority outside this machine is ever asked (the
ACME configs are only validated, inside an empty network namespace where one is available).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import urllib3

from infra.vm.caddy import CERT_MODES, caddyfile, plain_caddyfile
from tests.support import sse
from tests.support.live import LiveServer, free_port, stop_process, wait_for

SITE = "qb-test.eastus.cloudapp.azure.com"
LONG = {"message": "Tell me a long story", "stream": True, "max_tokens": 4000}
TOKEN = "proxy-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def caddy_exe() -> str:
    """Caddy's path; skipped where it is missing, but a failure in CI (which installs it)."""
    path = shutil.which("caddy")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("caddy is missing in CI (.ci/run installs it)")
        pytest.skip("caddy not installed (apt-get install caddy)")
    return path


def offline(argv: list[str]) -> list[str]:
    """`argv` in a network namespace of its own (nothing but its own loopback), where that is allowed."""
    unshare = shutil.which("unshare")
    for flags in (["-n"], ["-rn"]):
        if unshare and subprocess.run([unshare, *flags, "true"], capture_output=True).returncode == 0:
            return [unshare, *flags, *argv]
    return argv


def validate(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    return subprocess.run(
        offline([caddy_exe(), "validate", "--config", str(path), "--adapter", "caddyfile"]),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("cert", CERT_MODES)
def test_caddy_validates_the_deployed_config(cert, tmp_path):
    result = validate(caddyfile(SITE, cert), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def test_caddy_validate_is_a_real_check(tmp_path):
    broken = caddyfile(SITE, "acme").replace("flush_interval -1", "flush_interval soon")
    assert validate(broken, tmp_path).returncode != 0
    assert validate(caddyfile(SITE, "internal").replace("reverse_proxy", "reverse_prox"), tmp_path).returncode


class Caddy:
    """`caddy run` with a given Caddyfile, its state in a scratch folder, stopped by `stop()`."""

    def __init__(self, text: str, workdir: Path, port: int):
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "Caddyfile"
        self.config.write_text(text)
        self.log_path = workdir / "caddy.log"
        self._log = open(self.log_path, "wb")
        env = {
            **os.environ,
            "HOME": str(workdir),
            "XDG_DATA_HOME": str(workdir / "data"),
            "XDG_CONFIG_HOME": str(workdir / "config"),
        }
        self.process = subprocess.Popen(
            [caddy_exe(), "run", "--config", str(self.config), "--adapter", "caddyfile"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "caddy did not listen: " + self.log_path.read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process, self._log, grace=10)


@pytest.fixture(scope="module")
def app(endless_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The service as it runs on the VM behind Caddy: an access token, PROXY_HOPS=1, one generation at a
    time."""
    with LiveServer(
        {
            "MODEL_ID": str(endless_model_dir),
            "QUEUE_SIZE": "2",
            "MAX_BATCH": "1",
            "MAX_TOKENS_LIMIT": "4000",
            "PROXY_HOPS": "1",
            "ACCESS_TOKEN": TOKEN,
            "ALLOWED_HOSTS": SITE,  # as deploy-azure sets it: the VM's DNS name
        },
        tmp_path_factory.mktemp("proxy-app") / "gunicorn.log",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def plain_proxy(app: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Caddy with the deployed proxying, over plain HTTP on a loopback port (no certificate involved)."""
    caddy_exe()
    port = free_port()
    caddy = Caddy(
        plain_caddyfile(port, upstream=f"127.0.0.1:{app.port}"), tmp_path_factory.mktemp("caddy"), port
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        caddy.stop()


def queue(url: str, **kwargs) -> dict:
    r = requests.get(url + "/api/health", timeout=5, **kwargs)
    assert r.status_code == 200
    return r.json()["queue"]


def test_stream_passes_through_the_proxy_chunk_by_chunk(plain_proxy, app):
    wait_for(lambda: queue(app.url)["active"] == 0)
    response = requests.post(plain_proxy + "/api/chat", json=LONG, stream=True, timeout=30, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Server"].startswith("Caddy")
    stream = sse.events(response)
    first = next(stream)
    assert first["type"] == "delta"
    # The first piece is here while the model is still generating: the proxy did not hold it back.
    assert queue(plain_proxy)["active"] == 1
    pieces = [next(stream) for _ in range(10)]
    assert all(p["type"] == "delta" for p in pieces) and queue(app.url)["active"] == 1
    cancelled = queue(app.url)["cancelled"]
    response.close()
    # A client that goes away is gone for the app too, through the proxy: the generation stops.
    wait_for(lambda: queue(app.url)["active"] == 0)
    assert queue(app.url)["cancelled"] == cancelled + 1


def test_every_streamed_reply_arrives_whole(plain_proxy, app):
    """Many short streams in a row, each to its `done`: a proxy that now and then cuts a stream after its
    first chunk (Caddy 2.6 without buffer_requests: 1 stream in 30 to 100 here) most likely fails this."""
    wait_for(lambda: queue(app.url)["active"] == 0)
    cut = []
    for i in range(80):
        body = {"message": f"hi {i}", "stream": True, "max_tokens": 4}
        r = requests.post(plain_proxy + "/api/chat", json=body, timeout=30, headers=AUTH)
        kinds = [e["type"] for e in sse.events(r.content)]
        if r.status_code != 200 or kinds[-1:] != ["done"]:
            cut.append((i, r.status_code, r.content[:200]))
    assert cut == []


def test_openai_stream_through_the_proxy(plain_proxy, app):
    wait_for(lambda: queue(app.url)["active"] == 0)
    body = {
        "model": app_model(app),
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    assert requests.post(plain_proxy + "/v1/chat/completions", json=body, timeout=10).status_code == 401
    with requests.post(
        plain_proxy + "/v1/chat/completions", json=body, stream=True, timeout=60, headers=AUTH
    ) as r:
        assert r.status_code == 200
        payloads = list(sse.data(r))
    assert payloads[-1] == "[DONE]" and len(payloads) >= 3, payloads


def app_model(app: LiveServer) -> str:
    return requests.get(app.url + "/v1/models", timeout=5, headers=AUTH).json()["data"][0]["id"]


# -- the deployed config itself, with Caddy's own certificate authority, on loopback ports ------------------


@pytest.fixture(scope="module")
def https_proxy(app: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    caddy_exe()
    workdir = tmp_path_factory.mktemp("caddy-https")
    http_port, https_port = free_port(), free_port()
    storage = workdir / "storage"
    text = caddyfile(
        SITE,
        "internal",
        upstream=f"127.0.0.1:{app.port}",
        http_port=http_port,
        https_port=https_port,
        storage=str(storage),
        bind="127.0.0.1",
    )
    caddy = Caddy(text, workdir, https_port)
    root = storage / "pki/authorities/local/root.crt"
    try:
        wait_for(root.exists, timeout=30)
        proxy = {"http_port": http_port, "https_port": https_port, "root": str(root)}
        wait_for(lambda: https_get(proxy, "/api/health").status == 200, timeout=30)
        yield proxy
    finally:
        caddy.stop()


def https_pool(proxy: dict) -> urllib3.HTTPSConnectionPool:
    """Connects to 127.0.0.1 as if to the VM's name: SNI and the certificate check use SITE."""
    return urllib3.HTTPSConnectionPool(
        "127.0.0.1",
        proxy["https_port"],
        server_hostname=SITE,
        assert_hostname=SITE,
        cert_reqs="CERT_REQUIRED",
        ca_certs=proxy["root"],
        retries=False,
        timeout=urllib3.Timeout(30),
    )


def https_get(proxy: dict, path: str) -> urllib3.BaseHTTPResponse:
    try:
        with https_pool(proxy) as pool:
            return pool.request("GET", path, headers={"Host": f"{SITE}:{proxy['https_port']}"})
    except urllib3.exceptions.HTTPError:
        return urllib3.HTTPResponse(status=0)


def test_https_with_a_certificate_for_the_vms_name_and_http_redirects(https_proxy):
    r = https_get(https_proxy, "/api/health")
    assert r.status == 200 and json.loads(r.data)["status"] == "ok"
    redirect = requests.get(
        f"http://127.0.0.1:{https_proxy['http_port']}/api/health",
        timeout=10,
        headers={"Host": SITE},
        allow_redirects=False,
    )
    assert redirect.status_code == 308 and redirect.headers["Server"] == "Caddy"
    assert redirect.headers["Location"] == f"https://{SITE}:{https_proxy['https_port']}/api/health"


def test_https_stream_arrives_chunk_by_chunk(https_proxy, app):
    wait_for(lambda: queue(app.url)["active"] == 0)
    with https_pool(https_proxy) as pool:
        response = pool.request(
            "POST",
            "/api/chat",
            body=json.dumps(LONG).encode(),
            preload_content=False,
            headers={
                "Host": f"{SITE}:{https_proxy['https_port']}",
                "Content-Type": "application/json",
                **AUTH,
            },
        )
        assert response.status == 200
        first = next(sse.events(iter(lambda: response.read1(4096), b"")), None)
        assert first is not None, "the stream ended before its first piece"
        assert first["type"] == "delta"
        assert queue(app.url)["active"] == 1  # still generating: the piece was not held back
        response.release_conn()
        response.close()
    wait_for(lambda: queue(app.url)["active"] == 0)


def test_the_openai_client_over_https_as_the_readme_shows(https_proxy, app):
    """README's example: OpenAI(base_url=URL/v1, api_key=TOKEN, http_client=DefaultHttpxClient(verify=root)).

    The VM's name does not resolve here, so the client connects to 127.0.0.1 and sends the name in SNI
    and Host; the certificate is checked against the name and the saved root, as on a user's machine.
    """
    from openai import AuthenticationError, DefaultHttpxClient, OpenAI

    def as_the_vm(request) -> None:
        request.extensions["sni_hostname"] = SITE

    port = https_proxy["https_port"]
    http = DefaultHttpxClient(
        verify=https_proxy["root"], event_hooks={"request": [as_the_vm]}, headers={"Host": f"{SITE}:{port}"}
    )
    client = OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=TOKEN, http_client=http, max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, stream=True, max_tokens=24, messages=[{"role": "user", "content": "Hello"}]
    )
    chunks = [c for c in stream if c.choices]
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    wrong = OpenAI(
        base_url=f"https://127.0.0.1:{port}/v1", api_key="not-the-token", http_client=http, max_retries=0
    )
    with pytest.raises(AuthenticationError):
        wrong.models.list()
