"""Who we are in Azure and where Azure is: cloud endpoints, subscription, credential, SDK clients, SSH key.

Everything that reaches outside this machine for identity is a separate small function (the credential,
the public-IP lookup) so the CLI calls them only when needed and tests replace them: tests hand in a fake
credential and clients pointed at a fake ARM on loopback, and never let `DefaultAzureCredential` run (it
falls back to the instance metadata address, which is traffic off this machine).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from azure.core.credentials import TokenCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.monitor import MonitorManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.postgresqlflexibleservers import PostgreSQLManagementClient
from azure.mgmt.privatedns import PrivateDnsManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

PUBLIC_ARM = "https://management.azure.com"
PUBLIC_AUTHORITY = "https://login.microsoftonline.com"
PUBLIC_IP_SERVICE = "https://api.ipify.org"
NO_CREDENTIALS = (
    "no Azure subscription found: run `az login` (and `az account set --subscription ID`), "
    "or set AZURE_SUBSCRIPTION_ID (or pass --subscription)"
)


class CredentialsError(RuntimeError):
    """Azure identity or subscription is missing; the message says what to run."""


@dataclass(frozen=True)
class Cloud:
    """Endpoints of the Azure cloud to use. Public Azure by default; sovereign clouds set both.

    `AZURE_ARM_ENDPOINT` (e.g. https://management.usgovcloudapi.net) and `AZURE_AUTHORITY_HOST`
    (e.g. https://login.microsoftonline.us, the variable azure-identity itself reads).
    """

    arm_endpoint: str = PUBLIC_ARM
    authority_host: str = PUBLIC_AUTHORITY

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Cloud:
        env = os.environ if environ is None else environ
        return cls(
            arm_endpoint=(env.get("AZURE_ARM_ENDPOINT") or PUBLIC_ARM).rstrip("/"),
            authority_host=(env.get("AZURE_AUTHORITY_HOST") or PUBLIC_AUTHORITY).rstrip("/"),
        )

    @property
    def scope(self) -> str:
        return f"{self.arm_endpoint}/.default"

    @property
    def dns_zone(self) -> str:
        """The zone of public IP DNS labels (NAME.REGION.ZONE), which the HTTPS certificate names."""
        for marker, zone in (
            ("usgovcloudapi.net", "cloudapp.usgovcloudapi.net"),
            ("chinacloudapi.cn", "cloudapp.chinacloudapi.cn"),
        ):
            if self.arm_endpoint.endswith(marker):
                return zone
        return "cloudapp.azure.com"


@dataclass(frozen=True)
class RetrySettings:
    """Knobs for the SDK's own retry (429 with Retry-After, 408, 5xx) and long-running-operation polling.

    The SDK's RetryPolicy already honours Retry-After and backs off exponentially; we only size it.
    `total` bounds every kind of retry: azure-core counts answers (429, 5xx) separately and stops those
    at 3 unless told otherwise, so `connect` passes it as `retry_status` too. Tests shrink the waits.
    """

    total: int = 6
    backoff_factor: float = 1.0
    backoff_max: float = 60.0
    polling_interval: float = 5.0


@dataclass
class Writes:
    """The PUTs Azure accepted (2xx) through these clients, as (method, URL path): a PUT accepted is
    something created (or changed) that stays if a later step fails; none means nothing was."""

    accepted: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, response: Any) -> None:  # azure-core's raw_response_hook (a PipelineResponse)
        request, answer = response.http_request, response.http_response
        if request.method == "PUT" and 200 <= answer.status_code < 300:
            self.accepted.append((request.method, urlsplit(request.url).path))


@dataclass
class AzureClients:
    """The management clients for one subscription, plus TLS settings for blob downloads. The last three
    only a scale set uses (autoscale, its database, the database's private DNS zone)."""

    subscription: str
    resources: ResourceManagementClient
    network: NetworkManagementClient
    compute: ComputeManagementClient
    verify: bool | str = True
    monitor: MonitorManagementClient | None = None
    postgres: PostgreSQLManagementClient | None = None
    private_dns: PrivateDnsManagementClient | None = None
    writes: Writes = field(default_factory=Writes)


def resolve_subscription(
    flag: str = "", environ: Mapping[str, str] | None = None, profile: Path | None = None
) -> str:
    """The subscription id: `--subscription`, else AZURE_SUBSCRIPTION_ID, else the Azure CLI's default.

    The CLI profile is read as a file (`~/.azure/azureProfile.json`), so no `az` command runs.
    """
    env = os.environ if environ is None else environ
    if flag:
        return flag
    if env.get("AZURE_SUBSCRIPTION_ID"):
        return env["AZURE_SUBSCRIPTION_ID"]
    config_dir = Path(env.get("AZURE_CONFIG_DIR") or Path.home() / ".azure")
    path = profile or config_dir / "azureProfile.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        raise CredentialsError(NO_CREDENTIALS) from None
    for sub in data.get("subscriptions", []):
        if sub.get("isDefault") and sub.get("id"):
            return sub["id"]
    raise CredentialsError(NO_CREDENTIALS)


def default_credential(cloud: Cloud) -> TokenCredential:
    """DefaultAzureCredential for the cloud's authority (env vars, workload identity, az login, ...)."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(authority=cloud.authority_host)


def connect(
    cloud: Cloud,
    subscription: str,
    credential: TokenCredential,
    *,
    retry: RetrySettings | None = None,
    verify: bool | str = True,
    **client_kwargs: Any,
) -> AzureClients:
    """Management clients for `subscription` at the cloud's ARM endpoint, with our retry/polling sizes."""
    r = retry or RetrySettings()
    writes = Writes()
    common: dict[str, Any] = dict(
        raw_response_hook=writes,
        base_url=cloud.arm_endpoint,
        credential_scopes=[cloud.scope],
        retry_total=r.total,
        retry_status=r.total,
        retry_backoff_factor=r.backoff_factor,
        retry_backoff_max=r.backoff_max,
        polling_interval=r.polling_interval,
        connection_verify=verify,
        **client_kwargs,
    )
    return AzureClients(
        subscription=subscription,
        resources=ResourceManagementClient(credential, subscription, **common),
        network=NetworkManagementClient(credential, subscription, **common),
        compute=ComputeManagementClient(credential, subscription, **common),
        verify=verify,
        monitor=MonitorManagementClient(credential, subscription, **common),
        postgres=PostgreSQLManagementClient(credential, subscription, **common),
        private_dns=PrivateDnsManagementClient(credential, subscription, **common),
        writes=writes,
    )


def discover_public_ip(timeout: float = 10.0) -> str:
    """This machine's public IPv4 address as a /32, asked of an outside service.

    The CLI calls this only when a deployment needs the deployer's address and no --allow-from was
    given; tests replace it.
    """
    try:
        answer = requests.get(PUBLIC_IP_SERVICE, timeout=timeout).text.strip()
        address = ipaddress.IPv4Address(answer)
    except (requests.RequestException, ValueError):
        raise CredentialsError(
            "could not find your public IP address (needed to let only you in): pass "
            "--allow-from YOUR.IP.ADDRESS/32, or --public to open the port to "
            "everyone"
        ) from None
    return f"{address}/32"


SSH_KEY_NAMES = ("id_ed25519.pub", "id_rsa.pub", "id_ecdsa.pub")
GENERATED_KEY = "qwen-box_ed25519"


def ssh_public_key(ssh_dir: Path | None = None) -> tuple[str, Path, bool]:
    """An OpenSSH public key for the VM's only login: the user's own, or a new one saved beside it.

    Returns (key text, path of the public key, whether it was just generated). Azure accepts RSA and
    Ed25519 keys for Linux VMs; a new key is Ed25519, private part mode 0600.
    """
    folder = ssh_dir or Path.home() / ".ssh"
    for name in (*SSH_KEY_NAMES[:2], f"{GENERATED_KEY}.pub"):
        path = folder / name
        if path.is_file():
            return path.read_text().strip(), path, False
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = folder / GENERATED_KEY
    private.touch(mode=0o600)
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    public_text = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        + " qwen-box"
    )
    public = folder / f"{GENERATED_KEY}.pub"
    public.write_text(public_text + "\n")
    return public_text, public, True
