"""What an Azure deployment is: validated inputs, the resources they become, the exposure and the cost.

Pure data, no SDK and no network: `--dry-run` prints a `Plan` without calling anything, and
`infra/azure.py` builds its request bodies from the same `Deployment`, so the plan shown is the plan run.
"""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from infra.caddy import caddyfile
from infra.cloudinit import shown

APP_TAG = "qwen-box"
DEFAULT_REGION = "eastus"
DEFAULT_SIZE = "Standard_B2s"
DEFAULT_DISK_GB = 64
ADMIN_USER = "azureuser"
CONTAINER_PORT = 8000
UBUNTU_2404 = {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest"}
VNET_PREFIX = "10.42.0.0/16"
SUBNET_PREFIX = "10.42.0.0/24"
INTERNET = "Internet"

# Pay-as-you-go Linux list prices in USD per hour (East US, late 2025). An estimate to show the order of
# magnitude before anything is created, not a quote: other regions, discounts and currency differ.
HOURS_PER_MONTH = 730
VM_PRICE_PER_HOUR = {
    "standard_b2s": 0.0416,
    "standard_b2ms": 0.0832,
    "standard_b4ms": 0.166,
    "standard_d2s_v5": 0.096,
    "standard_d4s_v5": 0.192,
    "standard_d2as_v5": 0.086,
    "standard_d4as_v5": 0.172,
}
# Memory of each size in GiB (Azure's size pages): what the model-fit check compares against.
VM_MEMORY_GIB = {
    "standard_b2s": 4,
    "standard_b2ms": 8,
    "standard_b4ms": 16,
    "standard_d2s_v5": 8,
    "standard_d4s_v5": 16,
    "standard_d2as_v5": 8,
    "standard_d4as_v5": 16,
}
SIZE_NAMES = {
    k.lower(): k
    for k in (
        "Standard_B2s",
        "Standard_B2ms",
        "Standard_B4ms",
        "Standard_D2s_v5",
        "Standard_D4s_v5",
        "Standard_D2as_v5",
        "Standard_D4as_v5",
    )
}
PUBLIC_IP_PER_HOUR = 0.005
STANDARD_SSD_PER_MONTH = [(32, 2.40), (64, 4.80), (128, 9.60), (256, 19.20), (512, 38.40), (1024, 76.80)]

_NAME = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
_REGION = re.compile(r"^[a-z][a-z0-9]{2,30}$")
_SIZE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{2,63}$")


class PlanError(ValueError):
    """An option that cannot make a valid deployment; the message says which and why."""


def default_name() -> str:
    """A deployment name stable for this user on this machine and unlikely to collide in Azure DNS.

    The name becomes the DNS label `NAME.REGION.cloudapp.azure.com`, which must be unique per region, so
    a bare "qwen-box" would often be taken; a short hash of user@host keeps it unique yet repeatable.
    """
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    return f"{APP_TAG}-{hashlib.sha256(who.encode()).hexdigest()[:6]}"


def parse_sources(text: str) -> tuple[str, ...]:
    """`--allow-from`: one or more comma-separated IPv4 addresses or CIDR blocks, normalised."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise PlanError(
                f"--allow-from: {part!r} is not an IP address or CIDR block (e.g. 203.0.113.7 or "
                "203.0.113.0/24)"
            ) from None
        if net.prefixlen == 0:
            raise PlanError("--allow-from 0.0.0.0/0 means everyone: say --public instead, on purpose")
        out.append(str(net))
    if not out:
        raise PlanError("--allow-from needs at least one address or CIDR block")
    return tuple(out)


@dataclass(frozen=True)
class Names:
    """The names of everything in one deployment: a resource group per deployment, all named after it.

    status/logs/destroy need only these, so they work from any machine given the deployment's name.
    """

    name: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise PlanError(
                f"--name {self.name!r}: 3-32 characters, lower-case letters, digits and hyphens, "
                "starting with a letter (it becomes the DNS label "
                "NAME.REGION.cloudapp.azure.com)"
            )

    @property
    def group(self) -> str:
        return f"{self.name}-rg"

    @property
    def nsg(self) -> str:
        return f"{self.name}-nsg"

    @property
    def vnet(self) -> str:
        return f"{self.name}-vnet"

    @property
    def subnet(self) -> str:
        return "default"

    @property
    def public_ip(self) -> str:
        return f"{self.name}-ip"

    @property
    def nic(self) -> str:
        return f"{self.name}-nic"

    @property
    def vm(self) -> str:
        return f"{self.name}-vm"

    @property
    def os_disk(self) -> str:
        return f"{self.name}-osdisk"

    @property
    def tags(self) -> dict[str, str]:
        return {"app": APP_TAG, "deployment": self.name}


@dataclass(frozen=True)
class Deployment(Names):
    """Everything that decides what gets created. Validated on construction."""

    image: str = ""
    region: str = DEFAULT_REGION
    size: str = DEFAULT_SIZE
    port: int = 0  # the chat's public port; 0 = 443 with HTTPS, 80 without
    disk_gb: int = DEFAULT_DISK_GB
    public: bool = False
    allow_from: tuple[str, ...] = ()
    ssh: bool = False
    ssh_from: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    tls: bool = True
    trusted_cert: bool = False
    model: str = ""
    dns_zone: str = "cloudapp.azure.com"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.port == 0:
            object.__setattr__(self, "port", 443 if self.tls else 80)
        if self.tls and self.port == 80:
            raise PlanError(
                "--port 80 is the HTTP port, which redirects to HTTPS (and answers the "
                "certificate challenge); --port sets the HTTPS port (default 443), or add "
                "--no-tls for plain HTTP on 80"
            )
        if self.trusted_cert and not self.tls:
            raise PlanError("--trusted-cert is about the HTTPS certificate: drop it, or drop --no-tls")
        if not self.image:
            raise PlanError("--image is required (REGISTRY/NAME:TAG of the qwen-box image)")
        if not _REGION.match(self.region):
            raise PlanError(
                f"--region {self.region!r} does not look like an Azure region name (e.g. eastus, westeurope)"
            )
        if not _SIZE.match(self.size):
            raise PlanError(f"--size {self.size!r} does not look like a VM size (e.g. Standard_B2s)")
        if not 1 <= self.port <= 65535 or self.port == 22:
            raise PlanError(f"--port {self.port}: must be 1-65535 and not 22")
        if not 30 <= self.disk_gb <= 1024:
            raise PlanError(f"--disk-gb {self.disk_gb}: between 30 (the Ubuntu image) and 1024")

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.region}.{self.dns_zone}"

    @property
    def url(self) -> str:
        return site_url(self.fqdn, self.port, self.tls)

    @property
    def http_sources(self) -> tuple[str, ...]:
        """Who may reach the chat port."""
        return (INTERNET,) if self.public else self.allow_from

    @property
    def cert(self) -> str:
        """Where the HTTPS certificate comes from (see infra/caddy.py), "" without HTTPS.

        A public authority must reach the VM from the Internet to check it answers for its name, so a
        private VM gets its certificate from Caddy's own authority unless port 80 is opened for the
        challenge (--trusted-cert) or everything is public.
        """
        if not self.tls:
            return ""
        if self.public:
            return "acme"
        return "acme-http" if self.trusted_cert else "internal"

    @property
    def redirect_sources(self) -> tuple[str, ...]:
        """Who may reach port 80 (the redirect to HTTPS and the certificate challenge)."""
        return (INTERNET,) if self.cert.startswith("acme") else self.allow_from

    @property
    def caddyfile(self) -> str:
        """The reverse proxy's config on the VM ("" without HTTPS)."""
        return caddyfile(self.fqdn, self.cert, https_port=self.port) if self.tls else ""

    def with_sources(self, allow_from: tuple[str, ...], ssh_from: tuple[str, ...]) -> Deployment:
        """The same deployment with the deployer's address filled in (looked up only when needed)."""
        return self._with(allow_from=allow_from, ssh_from=ssh_from)

    def with_env(self, env: Mapping[str, str]) -> Deployment:
        """The same deployment with other service settings (the access token is added once it is known)."""
        return self._with(env=env)

    def _with(self, **changes: object) -> Deployment:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(changes)
        return Deployment(**values)


@dataclass(frozen=True)
class Plan:
    """The resources, exposure and monthly cost of a deployment, as shown before anything happens."""

    deployment: Deployment
    resources: list[tuple[str, str, str]]
    exposure: list[str]
    costs: list[tuple[str, float | None]]

    @property
    def monthly_total(self) -> float | None:
        if any(c is None for _, c in self.costs):
            return None
        return round(sum(c for _, c in self.costs if c is not None), 2)


def site_url(fqdn: str, port: int, tls: bool) -> str:
    """https://NAME/ (or http:// with --no-tls), with the port only when it is not the scheme's own."""
    scheme, default = ("https", 443) if tls else ("http", 80)
    return f"{scheme}://{fqdn}/" if port == default else f"{scheme}://{fqdn}:{port}/"


def disk_price(disk_gb: int) -> float:
    """Standard SSD bills by tier: the smallest tier that holds the disk."""
    for size, price in STANDARD_SSD_PER_MONTH:
        if disk_gb <= size:
            return price
    return STANDARD_SSD_PER_MONTH[-1][1]


def _sources(sources: tuple[str, ...], fallback: str) -> str:
    return ", ".join(sources) if sources else fallback


CERT_LINES = {
    "acme": "certificate: Let's Encrypt (publicly trusted), obtained and renewed by Caddy on the VM",
    "acme-http": "certificate: Let's Encrypt (publicly trusted) through the HTTP challenge on port 80; "
    "the chat port stays private",
    "internal": "certificate: from Caddy's own authority on the VM (a public one cannot reach a private VM "
    "to check it): encrypted, but browsers warn until you trust its root, which deploy-azure "
    "saves; --trusted-cert opens port 80 for a Let's Encrypt one",
}


def make_plan(d: Deployment) -> Plan:
    """Describe what `deploy` will create for `d`; needs no credentials and sends nothing anywhere."""
    ssh = "port 22 open" if d.ssh else "no inbound SSH rule"
    ports = f"{d.port} and 80" if d.tls else f"{d.port}"
    resources = [
        ("Resource group", d.group, f"{d.region}, tags app={APP_TAG} deployment={d.name}"),
        ("Network security group", d.nsg, f"inbound TCP {ports}" + (" and 22" if d.ssh else "")),
        ("Virtual network", d.vnet, f"{VNET_PREFIX}, subnet {d.subnet} {SUBNET_PREFIX}"),
        ("Public IP (Standard, static)", d.public_ip, f"DNS {d.fqdn}"),
        ("Network interface", d.nic, f"in {d.subnet}, with {d.public_ip} and {d.nsg}"),
        (
            "Virtual machine",
            d.vm,
            f"{d.size}, Ubuntu 24.04 LTS Gen2, SSH key login only ({ssh}), boot diagnostics on",
        ),
        ("Managed OS disk", d.os_disk, f"{d.disk_gb} GiB Standard SSD, deleted with the VM"),
    ]
    you = "your public IP (looked up when deploying)"
    everyone = "OPEN TO THE WHOLE INTERNET"
    chat = f"TCP {d.port} (chat, {'HTTPS' if d.tls else 'HTTP'})"
    if d.public:
        exposure = [f"{chat}: {everyone} (--public)"]
    else:
        exposure = [f"{chat}: only from {_sources(d.allow_from, you)}"]
    if d.tls:
        redirect = "TCP 80 (redirect to HTTPS, certificate challenge; no chat)"
        if d.redirect_sources == (INTERNET,):
            exposure.append(f"{redirect}: open to the whole Internet (a public CA must reach it)")
        else:
            exposure.append(f"{redirect}: only from {_sources(d.allow_from, you)}")
        exposure.append(CERT_LINES[d.cert])
    else:
        exposure.append("no HTTPS (--no-tls): the chat and its access token travel unencrypted")
    exposure.append(
        f"TCP 22 (SSH, key only): only from {_sources(d.ssh_from or d.allow_from, you)}"
        if d.ssh
        else "TCP 22 (SSH): closed (add --ssh to open it to the same source)"
    )
    exposure.append("everything else inbound: denied (Azure's default rules)")
    hourly = VM_PRICE_PER_HOUR.get(d.size.lower())
    costs: list[tuple[str, float | None]] = [
        (f"VM {d.size} (running all month)", round(hourly * HOURS_PER_MONTH, 2) if hourly else None),
        (f"OS disk {d.disk_gb} GiB Standard SSD", disk_price(d.disk_gb)),
        ("Standard static public IP", round(PUBLIC_IP_PER_HOUR * HOURS_PER_MONTH, 2)),
    ]
    return Plan(d, resources, exposure, costs)


def plan_lines(plan: Plan) -> list[str]:
    """The plan as plain text lines (what --dry-run prints)."""
    d = plan.deployment
    lines = [
        f"Deployment {d.name!r}: image {d.image} on a {d.size} VM in {d.region}",
        f"URL when ready: {d.url}",
        "",
        "Resources (one resource group; destroy-azure deletes it all):",
    ]
    lines += [f"  - {kind}: {name} ({detail})" for kind, name, detail in plan.resources]
    lines += ["", "Exposure:"] + [f"  - {e}" for e in plan.exposure]
    lines += [
        "",
        "Estimated monthly cost (USD, East US pay-as-you-go list prices; an estimate, not a quote):",
    ]
    for what, cost in plan.costs:
        lines.append(
            f"  - {what}: "
            + (f"${cost:.2f}" if cost is not None else "unknown size: see the Azure pricing calculator")
        )
    total = plan.monthly_total
    lines.append(f"  = about ${total:.2f} a month" if total is not None else "  = total unknown")
    lines.append("  A stopped (deallocated) VM still bills its disk and IP; destroy-azure stops all billing.")
    if d.env:
        lines += ["", "Service settings: " + ", ".join(f"{k}={v}" for k, v in sorted(shown(d.env).items()))]
    return lines
