"""The Caddyfile of the VM's reverse proxy: HTTPS (or, with --no-tls, plain HTTP) in front of the chat
service, which listens on loopback in every mode.

Caddy (Debian/Ubuntu's `caddy` package, the same 2.6 series in Debian bookworm, where the tests run it,
and Ubuntu 24.04, where the VM runs it) terminates TLS for the VM's DNS name, redirects HTTP to HTTPS,
renews the certificate by itself and passes server-sent events through unbuffered (`flush_interval -1`).
The tests run Caddy's own validator on this text and a real Caddy with it on loopback.

Where the certificate comes from (`cert`):

- `acme`: a publicly trusted one (Let's Encrypt, falling back to ZeroSSL), obtained and renewed
  automatically. The certificate authority must reach the VM on port 80 or 443 from the Internet to
  check that it answers for the name, so this needs those ports open to the Internet.
- `acme-http`: the same, with the TLS-ALPN challenge turned off, for a VM whose port 80 is open to the
  Internet but whose HTTPS port is not (the chat stays private; only the challenge and the redirect
  are public).
- `internal`: Caddy's own certificate authority on the VM, for a VM that no public authority can reach.
  Encrypted all the same, but not trusted by browsers until its root certificate is trusted.
- `provided`: a certificate given to the VM with its secrets (PROVIDED_DIR), for a scale set, where one
  name stands in front of many instances: each instance running its own ACME order for the same name
  would race the others through the load balancer, and each its own authority would give every
  instance another root. deploy-azure generates a CA and a server certificate (or takes the user's).
  With it Caddy also answers `/api/health` for any host name and without SNI (`default_sni`), since the
  load balancer's probe and the application health extension ask by address, not by name.
"""

from __future__ import annotations

import re

from infra.image import CONTAINER_PORT
from service.config import Settings

CERT_MODES = ("acme", "acme-http", "internal", "provided")
PROVIDED_DIR = "/etc/caddy/qwen-box-tls"  # cert.pem, key.pem: owned by caddy, installed by cloud-init.yaml
UPSTREAM = f"127.0.0.1:{CONTAINER_PORT}"  # the container, published on loopback only behind Caddy
# The largest body Caddy passes on: what the service itself reads with its default settings (1 MB of
# JSON plus four 5 MB images in base64, about 27.7 MB), so the app's own 413 speaks for anything larger.
# Caddy used to stop at 4 MB, cutting any image over ~3 MB into a 502 with an empty body.
MAX_BODY = Settings().largest_request_bytes
_SITE = re.compile(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$")
HSTS = "max-age=31536000"  # one year; no includeSubDomains (cloudapp.azure.com names are not ours)
READ_HEADER_TIMEOUT = "10s"


def _servers() -> str:
    """Global server options: HTTP/1.1 and HTTP/2 only, so no HTTP/3 is advertised (Alt-Svc) on UDP 443,
    which the NSG does not open; and a deadline for a request's headers, so half-sent ones are dropped.

    No whole-request deadline (`read_body`): Go applies it to the connection for the whole exchange,
    and it would cut a streamed reply that lasts longer.
    """
    timeouts = f"\t\ttimeouts {{\n\t\t\tread_header {READ_HEADER_TIMEOUT}\n\t\t}}"
    return f"\tservers {{\n\t\tprotocols h1 h2\n{timeouts}\n\t}}"


def _proxy(upstream: str, max_body: int) -> str:
    """To the app, each response chunk flushed as it comes; Caddy sets X-Forwarded-For itself
    (replacing any a client sent), which is what the app's PROXY_HOPS=1 trusts.

    The request body is read whole before it is sent on (`buffer_requests`, bounded by
    `request_body`): without it, Caddy 2.6 over HTTP/1.1 now and then cuts a streamed reply to a POST
    after its first chunk, once the app answers before the proxy has seen the end of the body (about 1
    stream in 30 to 100 on loopback; tests/test_proxy.py repeats streams to catch it).
    """
    return (
        f"\trequest_body {{\n\t\tmax_size {int(max_body)}\n\t}}\n"
        f"\treverse_proxy {upstream} {{\n\t\tflush_interval -1\n\t\tbuffer_requests\n\t}}"
    )


def caddyfile(
    site: str,
    cert: str,
    *,
    upstream: str = UPSTREAM,
    http_port: int = 80,
    https_port: int = 443,
    storage: str = "",
    bind: str = "",
    tls_dir: str = PROVIDED_DIR,
    max_body: int = MAX_BODY,
) -> str:
    """The Caddyfile serving `site` over HTTPS on `https_port`, redirecting `http_port` to it.

    `storage` (a folder for certificates and keys), `bind` (an address to listen on) and `tls_dir` (where
    the `provided` certificate is) are for tests;
    on the VM Caddy listens on every address and keeps its keys in its own data folder
    (/var/lib/caddy). The admin API is off: nothing changes the config but a restart.
    """
    if cert not in CERT_MODES:
        raise ValueError(f"certificate mode {cert!r}: one of {', '.join(CERT_MODES)}")
    if not _SITE.match(site):
        raise ValueError(f"{site!r} is not a DNS name")
    options = ["\tadmin off", _servers()]
    if bind:
        options.append(f"\tdefault_bind {bind}")
    if http_port != 80:
        options.append(f"\thttp_port {int(http_port)}")
    if https_port != 443:
        options.append(f"\thttps_port {int(https_port)}")
    if cert == "internal":
        options.append("\tskip_install_trust")
    if storage:
        options.append(f"\tstorage file_system {{\n\t\troot {storage}\n\t}}")
    site_lines = []
    if cert.startswith("acme"):
        # Only with a publicly trusted certificate: pinning browsers to HTTPS for a name whose
        # certificate they cannot check (the VM's own authority) would lock them out for a year.
        site_lines.append(f'\theader Strict-Transport-Security "{HSTS}"')
    if cert == "provided":
        options.append(f"\tdefault_sni {site}")
    if cert == "internal":
        site_lines.append("\ttls internal")
    elif cert == "provided":
        site_lines.append(f"\ttls {tls_dir}/cert.pem {tls_dir}/key.pem")
    elif cert == "acme-http":
        site_lines.append("\ttls {\n\t\tissuer acme {\n\t\t\tdisable_tlsalpn_challenge\n\t\t}\n\t}")
    site_lines.append(_proxy(upstream, max_body))
    target = site if https_port == 443 else f"{site}:{int(https_port)}"
    probe = ""
    if cert == "provided":
        # Health probes ask by address (no SNI, Host = an IP or localhost): only /api/health, sent on as
        # the site's name (Host and X-Forwarded-Host, which the service reads behind its proxy) so its
        # ALLOWED_HOSTS accepts it; anything else is 404 here.
        probe = (
            f"# Health probes of the load balancer and the scale set, by address, not by name.\n"
            f"https://:{int(https_port)} {{\n\ttls {tls_dir}/cert.pem {tls_dir}/key.pem\n"
            f"\thandle /api/health {{\n\t\treverse_proxy {upstream} {{\n\t\t\theader_up Host {site}\n"
            f"\t\t\theader_up X-Forwarded-Host {site}\n"
            f"\t\t}}\n\t}}\n\trespond 404\n}}\n\n"
        )
    return (
        "# qwen-box: HTTPS for the chat service on loopback; written by invoke deploy-azure.\n"
        "{\n" + "\n".join(options) + "\n}\n\n"
        f"{site} {{\n"
        + "\n".join(site_lines)
        + "\n}\n\n"
        + probe
        + "# Plain HTTP only redirects (Caddy answers certificate challenges on it before any route).\n"
        f"http://{site} {{\n\tredir https://{target}{{uri}} 308\n}}\n"
    )


def http_caddyfile(port: int, *, upstream: str = UPSTREAM, bind: str = "", max_body: int = MAX_BODY) -> str:
    """--no-tls: plain HTTP on `port` for any host name, with the same proxying as `caddyfile`.

    Caddy stays in front without HTTPS too, so the app is never the public listener: gunicorn gives each
    connection that has started a request one of its threads, and a few dozen slow or half-sent
    requests would hold them all; Caddy reads each request whole (headers within a deadline, the body
    into a buffer) before the app sees it. `bind` is for tests (the VM listens on every address).
    """
    options = ["\tadmin off", "\tauto_https off", _servers()]
    if bind:
        options.append(f"\tdefault_bind {bind}")
    return (
        "# qwen-box: plain HTTP (--no-tls) for the chat service on loopback; written by deploy-azure.\n"
        "{\n" + "\n".join(options) + "\n}\n\n"
        f"http://:{int(port)} {{\n{_proxy(upstream, max_body)}\n}}\n"
    )


def plain_caddyfile(listen_port: int, *, upstream: str = UPSTREAM) -> str:
    """The --no-tls config on one loopback port: for testing the proxying itself (streaming, forwarded
    headers) without any certificate."""
    return http_caddyfile(listen_port, upstream=upstream, bind="127.0.0.1")
