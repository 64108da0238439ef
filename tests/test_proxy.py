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

import io
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
import yaml

from infra.azure import certs
from infra.azure.deployment import Deployment
from infra.health import probe
from infra.vm import cloudinit
from infra.vm.caddy import CERT_MODES, caddyfile, http_caddyfile, plain_caddyfile
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


def delivered(tmp_path: Path) -> tuple[str, certs.ServerCertificate]:
    """A scale set's certificate for SITE, in a folder as cloud-init installs it for Caddy."""
    made = certs.generate(SITE)
    folder = tmp_path / "tls"
    folder.mkdir(exist_ok=True)
    (folder / "cert.pem").write_text(made.cert)
    (folder / "key.pem").write_text(made.key)
    return str(folder), made


@pytest.mark.parametrize("cert", CERT_MODES)
def test_caddy_validates_the_deployed_config(cert, tmp_path):
    extra = {"tls_dir": delivered(tmp_path)[0]} if cert == "provided" else {}
    result = validate(caddyfile(SITE, cert, **extra), tmp_path)
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


def test_the_proxy_lets_through_every_body_the_app_reads(plain_proxy):
    """Four images of almost IMAGE_MAX_BYTES each (a 25 MB body) reach the app, which answers for
    them (a text model: 422, JSON): Caddy stopped at 4 MB, so any image over ~3 MB was a 502 with an
    empty body. A body larger than the app reads is still refused, by Caddy, with 413."""
    import base64
    import os

    from PIL import Image

    from service.config import Settings

    buf = io.BytesIO()
    Image.frombytes("RGB", (1300, 1200), os.urandom(1300 * 1200 * 3)).save(buf, "PNG", compress_level=0)
    assert 4_000_000 < len(buf.getvalue()) <= Settings().image_max_bytes
    picture = base64.b64encode(buf.getvalue()).decode()
    body = {"message": "what is it?", "images": [picture] * 4, "max_tokens": 2}
    r = requests.post(plain_proxy + "/api/chat", json=body, timeout=120, headers=AUTH)
    assert r.status_code == 422 and "cannot see images" in r.json()["error"]["message"]
    too_big = b"x" * (Settings().largest_request_bytes + 10)
    r = requests.post(
        plain_proxy + "/api/chat",
        data=too_big,
        timeout=120,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 413


def test_the_page_arrives_compressed_through_the_proxy(plain_proxy):
    """The app compresses the page and its scripts; Caddy passes that through as it is (no `encode` of
    its own, which would also match event streams)."""
    for path in ("/", "/static/js/main.js", "/static/style.css"):
        r = requests.get(plain_proxy + path, headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip", path
        assert len(r.content) > 0 and int(r.raw.headers.get("Content-Length", 1 << 30)) < len(r.content)


def test_the_deploys_plain_http_probe_asks_as_the_vms_name(plain_proxy):
    """The service answers only to the names in ALLOWED_HOSTS (the VM's DNS name), so deploy-azure's
    health probe over plain HTTP (--no-tls), which connects to the VM's IP, must send that name."""
    port = int(plain_proxy.rsplit(":", 1)[1])
    assert probe("127.0.0.1", port, server_name=SITE).phase == "ok"
    as_another = probe("127.0.0.1", port, server_name="qb-other.eastus.cloudapp.azure.com")
    assert as_another.phase != "ok" and "400" in as_another.detail  # the name went as Host, and counted


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


# -- what the proxy advertises: no HTTP/3 (the NSG lets TCP only), HSTS only with a public certificate ---


def adapted(text: str, tmp_path: Path) -> dict:
    """The JSON config Caddy's own adapter makes of `text`: what Caddy will actually run."""
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "d")}
    result = subprocess.run(
        offline([caddy_exe(), "adapt", "--config", str(path), "--adapter", "caddyfile"]),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def hsts_values(config: dict) -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("handler") == "headers":
                found.extend(node.get("response", {}).get("set", {}).get("Strict-Transport-Security", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


@pytest.mark.parametrize("cert", CERT_MODES)
def test_every_server_speaks_tcp_only_and_hsts_needs_a_public_certificate(cert, tmp_path):
    servers = adapted(caddyfile(SITE, cert), tmp_path)["apps"]["http"]["servers"]
    assert servers and all(s.get("protocols") == ["h1", "h2"] for s in servers.values()), servers
    assert all(s.get("read_header_timeout") for s in servers.values())
    hsts = hsts_values({"servers": servers})
    if cert.startswith("acme"):
        assert len(hsts) == 1 and hsts[0].startswith("max-age=31536000"), hsts
    else:
        assert hsts == []  # the VM's own authority: a browser must stay free to refuse it later


def udp_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
    return ports


def test_https_advertises_no_http3_and_listens_on_no_udp(https_proxy):
    with https_pool(https_proxy) as pool:
        r = pool.request("GET", "/api/health", headers={"Host": f"{SITE}:{https_proxy['https_port']}"})
    assert r.status == 200
    assert "alt-svc" not in {k.lower() for k in r.headers}, dict(r.headers)
    assert "strict-transport-security" not in {k.lower() for k in r.headers}
    assert https_proxy["https_port"] not in udp_ports()


def test_a_public_certificate_brings_hsts_over_https(app, tmp_path):
    """The acme config as deployed, run with `local_certs` added so the certificate comes from Caddy's own
    authority on this machine instead of Let's Encrypt (no request leaves loopback)."""
    http_port, https_port = free_port(), free_port()
    storage = tmp_path / "storage"
    text = caddyfile(
        SITE,
        "acme",
        upstream=f"127.0.0.1:{app.port}",
        http_port=http_port,
        https_port=https_port,
        storage=str(storage),
        bind="127.0.0.1",
    ).replace("\tadmin off\n", "\tadmin off\n\tlocal_certs\n\tskip_install_trust\n", 1)
    caddy = Caddy(text, tmp_path / "caddy", https_port)
    try:
        root = storage / "pki/authorities/local/root.crt"
        wait_for(root.exists, timeout=30)
        proxy = {"https_port": https_port, "root": str(root)}
        wait_for(lambda: https_get(proxy, "/api/health").status == 200, timeout=30)
        r = https_get(proxy, "/api/health")
        assert r.headers["Strict-Transport-Security"].startswith("max-age=31536000")
        assert "alt-svc" not in {k.lower() for k in r.headers}
        plain = requests.get(
            f"http://127.0.0.1:{http_port}/", headers={"Host": SITE}, allow_redirects=False, timeout=10
        )
        assert plain.status_code == 308 and "Strict-Transport-Security" not in plain.headers
    finally:
        caddy.stop()


# -- --no-tls: Caddy still holds the public port, and slow clients cannot starve the app --------------


def test_slow_clients_on_the_plain_http_port_cannot_starve_health(app, tmp_path):
    """28 connections that hold a gunicorn thread each when they reach it (idle, headers half sent, a body
    half sent: the app has 16 threads) go to the port a --no-tls VM exposes; health still answers
    through it within a few seconds, because Caddy reads every request whole before the app sees it."""
    d = Deployment(
        name="qb-test", image="myreg.azurecr.io/qwen-box:1", allow_from=("203.0.113.7/32",), tls=False
    )
    assert d.caddyfile == http_caddyfile(80)  # the deployed config: Caddy in front, not gunicorn
    rendered = yaml.safe_load(cloudinit.render(d.image, d.port, {}, caddyfile=d.caddyfile))
    files = {f["path"]: f["content"] for f in rendered["write_files"]}
    assert files["/etc/qwen-box/port"] == "127.0.0.1:8000\n" and files["/etc/qwen-box/Caddyfile"]

    port = free_port()
    caddy = Caddy(http_caddyfile(port, upstream=f"127.0.0.1:{app.port}", bind="127.0.0.1"), tmp_path, port)
    slow: list[socket.socket] = []
    try:
        for i in range(28):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 3 == 1:
                s.sendall(b"GET /api/health HTTP/1.1\r\nHost: qb-test\r\nX-Slow: ")
            elif i % 3 == 2:
                s.sendall(
                    b"POST /api/chat HTTP/1.1\r\nHost: qb-test\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 100000\r\n\r\n{"message": "'
                )
            slow.append(s)
        time.sleep(0.5)
        for _ in range(5):
            started = time.monotonic()
            r = requests.get(f"http://127.0.0.1:{port}/api/health", timeout=3)
            assert r.status_code == 200 and r.json()["status"] == "ok"
            assert time.monotonic() - started < 3
            assert requests.get(app.url + "/api/health", timeout=3).status_code == 200
            time.sleep(0.2)
    finally:
        for s in slow:
            s.close()
        caddy.stop()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_a_scale_set_instance_serves_its_name_and_answers_probes_by_address(app, tmp_path):
    """The `provided` certificate (a scale set's, delivered with the secrets): the chat by name, checked
    against the generated root; /api/health also by address without SNI, as the load balancer's probe
    and the health extension ask, passed on as the site's name (so ALLOWED_HOSTS lets it in); nothing
    else by address."""
    caddy_exe()
    tls_dir, made = delivered(tmp_path)
    (tmp_path / "root.pem").write_text(made.ca)
    http_port, https_port = free_port(), free_port()
    text = caddyfile(
        SITE,
        "provided",
        upstream=f"127.0.0.1:{app.port}",
        http_port=http_port,
        https_port=https_port,
        storage=str(tmp_path / "storage"),
        bind="127.0.0.1",
        tls_dir=tls_dir,
    )
    caddy = Caddy(text, tmp_path / "caddy", https_port)
    try:
        proxy = {"https_port": https_port, "root": str(tmp_path / "root.pem")}
        wait_for(lambda: https_get(proxy, "/api/health").status == 200, timeout=30)
        by_address = urllib3.HTTPSConnectionPool(
            "127.0.0.1", https_port, cert_reqs="CERT_NONE", assert_hostname=False, retries=False, timeout=30
        )
        with by_address as pool:
            health = pool.request("GET", "/api/health", headers={"Host": "10.42.0.4"})
            page = pool.request("GET", "/", headers={"Host": "10.42.0.4"})
        assert health.status == 200 and json.loads(health.data)["status"] == "ok", health.data
        assert page.status == 404
        health = probe("127.0.0.1", https_port, tls=True, server_name=SITE, verify=str(tmp_path / "root.pem"))
        assert health.phase == "ok"
    finally:
        caddy.stop()
