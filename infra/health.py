"""Is the service up yet? One probe of /api/health and one wait loop, for run-local and deploy-azure.

Both wait for the same service to load its model, so they share what an answer means and how often to
ask; each caller passes what differs: where to ask (a local port, or the VM's address with its DNS name
for HTTPS), a stop condition (run-local: the container exited), and what to show on the way.

The service answers 503 `loading`, 200 `ok` or 503 `error`; before the container runs on a VM,
cloud-init's status page answers on the same port with the provisioning phase (`pulling`, ...). When
nothing answers, the probe says why, since each cause has its own remedy: `unreachable` (the connection
timed out or found no route: on Azure the NSG drops what is not from an allowed source, or the VM is
not up; or it was refused: up, but nothing listens yet), `tls` (a TCP connection but no TLS session:
Caddy has no certificate yet) and `starting` (an HTTP answer that is not the service's, e.g. the
proxy's 502 while the container starts).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import requests
import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

PHASES = {
    "provisioning": "provisioning Azure resources",
    "booting": "booting the VM",
    "unreachable": "no answer",
    "tls": "HTTPS not ready",
    "installing": "installing Docker",
    "secrets": "waiting for the secrets (Custom Script extension)",
    "pulling": "pulling the image",
    "starting": "starting the container",
    "loading": "loading the model",
    "ok": "ready",
    "error": "failed",
    "stopped": "stopped",
}
# Waiting longer cannot change these: ready, the service's own failure, or the caller's stop condition.
FINAL_PHASES = ("ok", "error", "stopped")
# Nothing of the service answered yet (run-local calls all of these "starting the server").
NO_ANSWER_PHASES = ("booting", "unreachable", "tls")
TIMED_OUT, NO_ROUTE, REFUSED = "connection timed out", "no route to host", "connection refused"


@dataclass(frozen=True)
class Health:
    """What the health endpoint says: a phase (see PHASES) and any detail it gave."""

    phase: str
    detail: str = ""

    @property
    def blocked(self) -> bool:
        """No connection at all (timed out, no route): a firewall, the NSG's source list, or a VM
        that is down, rather than a service still starting."""
        return self.phase == "unreachable" and self.detail in (TIMED_OUT, NO_ROUTE)

    @property
    def label(self) -> str:
        text = PHASES.get(self.phase, self.phase)
        return f"{text}: {self.detail}" if self.detail and self.phase not in ("ok",) else text


def _get_health_https(
    host: str, port: int, server_name: str, verify: bool | str, timeout: float
) -> tuple[int, bytes]:
    """GET /api/health over HTTPS from `host` (the VM's IP) as if from `server_name` (its DNS name): SNI,
    Host and the certificate check all use the name, while the connection goes to the address."""
    ca = verify if isinstance(verify, str) else os.environ.get("REQUESTS_CA_BUNDLE", DEFAULT_CA_BUNDLE_PATH)
    pool = urllib3.HTTPSConnectionPool(
        host,
        port,
        timeout=urllib3.Timeout(timeout),
        retries=False,
        server_hostname=server_name,
        cert_reqs="CERT_REQUIRED" if verify else "CERT_NONE",
        ca_certs=ca if verify else None,
        assert_hostname=server_name if verify else False,
    )
    with pool, warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        netloc = server_name if port == 443 else f"{server_name}:{port}"
        response = pool.request("GET", "/api/health", headers={"Host": netloc}, redirect=False)
        return response.status, response.data


def probe(
    host: str,
    port: int,
    timeout: float = 5.0,
    *,
    tls: bool = False,
    server_name: str = "",
    verify: bool | str = True,
) -> Health:
    """One look at http(s)://HOST:PORT/api/health.

    With `tls`, `server_name` is the name the certificate is checked against, and `verify` is True (the
    system's CAs, or REQUESTS_CA_BUNDLE), a CA file, or False (encrypted but unchecked: only for the
    phase, nothing secret is sent).
    """
    try:
        if tls:
            status_code, data = _get_health_https(host, port, server_name or host, verify, timeout)
        else:
            netloc = host if port == 80 else f"{host}:{port}"
            # As from the VM's name: the service answers only to the host names it was given.
            named = {"Host": server_name if port == 80 else f"{server_name}:{port}"} if server_name else {}
            response = requests.get(f"http://{netloc}/api/health", timeout=timeout, headers=named)
            status_code, data = response.status_code, response.content
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        return _no_answer(exc)
    try:
        body = json.loads(data)
    except ValueError:
        return Health("starting", f"HTTP {status_code}, not the service yet")
    status = body.get("status", "") if isinstance(body, dict) else ""
    if status in PHASES:
        return Health(status, str(body.get("detail") or body.get("model") or ""))
    return Health("starting", f"HTTP {status_code}, not the service yet")


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (requests -> urllib3 -> socket), outermost first."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 12:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *getattr(e, "args", ())]
    return seen


def _no_answer(exc: BaseException) -> Health:
    """Why a probe got no HTTP answer, as a phase: unreachable (timed out, no route, refused) or tls."""
    causes = _causes(exc)
    for e in causes:
        if isinstance(e, ssl.SSLError | urllib3.exceptions.SSLError | requests.exceptions.SSLError):
            inner = next((c for c in causes if isinstance(c, ssl.SSLError)), e)
            reason = getattr(inner, "reason", None) or str(inner).splitlines()[0][:120]
            return Health("tls", f"no TLS session yet ({reason})")
    for e in causes:
        if isinstance(e, ConnectionRefusedError):
            return Health("unreachable", REFUSED)
        if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return Health("unreachable", NO_ROUTE)
    for e in causes:
        if isinstance(
            e,
            requests.ConnectTimeout | urllib3.exceptions.ConnectTimeoutError | socket.timeout | TimeoutError,
        ) and not isinstance(e, requests.ReadTimeout | urllib3.exceptions.ReadTimeoutError):
            return Health("unreachable", TIMED_OUT)
    for e in causes:
        if isinstance(e, requests.ReadTimeout | urllib3.exceptions.ReadTimeoutError):
            return Health("starting", "connected, but no HTTP answer in time")
    return Health("unreachable", str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__)


def _keep_waiting() -> str:
    return ""


def wait_healthy(
    host: str,
    port: int,
    *,
    timeout: float,
    interval: float = 5.0,
    on_phase: Callable[[Health], None] = lambda h: None,
    on_poll: Callable[[Health, float], None] = lambda h, elapsed: None,
    stop_if: Callable[[], str] = _keep_waiting,
    probe_timeout: float = 5.0,
    tls: bool = False,
    server_name: str = "",
    verify: bool | str = True,
) -> Health:
    """Poll the health endpoint until ok or error, or until `timeout` seconds; return the last answer.

    Checks come quickly at first, then every `interval` seconds. `on_phase` hears each new phase,
    `on_poll` every look (with the seconds since the start). `stop_if` is asked before each look: a
    non-empty answer ends the wait at once as Health("stopped", that answer) (run-local: the container
    exited, so waiting cannot help). A VM is polled at its IP rather than its DNS name: a brand-new DNS
    label can take a while to resolve everywhere, and a resolver that cached "no such name" would stall
    the wait for no reason (with HTTPS the name still goes in SNI and Host).
    """
    seen: list[Health] = []
    started = time.monotonic()

    def look() -> Health:
        reason = stop_if()
        health = (
            Health("stopped", reason)
            if reason
            else probe(host, port, timeout=probe_timeout, tls=tls, server_name=server_name, verify=verify)
        )
        if not seen or seen[-1] != health:
            seen.append(health)
            on_phase(health)
        on_poll(health, time.monotonic() - started)
        return health

    retrying = Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.1, max=interval),
        retry=retry_if_result(lambda h: h.phase not in FINAL_PHASES),
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else Health("booting"),
    )
    return retrying(look)
