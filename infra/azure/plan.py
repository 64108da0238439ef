"""The plan of a deployment as shown before anything happens: the resources it creates, who can reach
what (exposure) and the monthly cost estimate.

`--dry-run` prints `plan_lines(make_plan(d))` and stops; a real deploy prints the exposure lines of the
same plan before it starts. Pure: reads only the `Deployment` and the size and price tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.azure.deployment import APP_TAG, INTERNET, SUBNET_PREFIX, VNET_PREFIX, Deployment
from infra.azure.sizes import HOURS_PER_MONTH, PUBLIC_IP_PER_HOUR, disk_price, monthly_price
from infra.settings import shown


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
    costs: list[tuple[str, float | None]] = [
        (f"VM {d.size} (running all month)", monthly_price(d.size)),
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
    # The access token has its own lines in the deploy's output (shown once, or where it is kept).
    settings = {k: v for k, v in shown(d.env).items() if k != "ACCESS_TOKEN"}
    if settings:
        lines += ["", "Service settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))]
    return lines
