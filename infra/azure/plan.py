"""The plan of a deployment as shown before anything happens: the resources it creates, who can reach
what (exposure) and the monthly cost estimate.

`--dry-run` prints `plan_lines(make_plan(d))` and stops; a real deploy prints the exposure lines of the
same plan before it starts. Pure: reads only the `Deployment` and the size and price tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from infra.azure.deployment import (
    APP_TAG,
    DB_SUBNET_PREFIX,
    INTERNET,
    SUBNET_PREFIX,
    VNET_PREFIX,
    Deployment,
)
from infra.azure.sizes import (
    HOURS_PER_MONTH,
    LOAD_BALANCER_PER_HOUR,
    NAT_GATEWAY_PER_HOUR,
    POSTGRES_B1MS_PER_HOUR,
    POSTGRES_STORAGE_GB_MONTH,
    PRIVATE_DNS_ZONE_PER_MONTH,
    PUBLIC_IP_PER_HOUR,
    disk_price,
    monthly_price,
)
from infra.settings import shown


@dataclass(frozen=True)
class Plan:
    """The resources, exposure and monthly cost of a deployment, as shown before anything happens."""

    deployment: Deployment
    resources: list[tuple[str, str, str]]
    exposure: list[str]
    costs: list[tuple[str, float | None]]
    max_costs: list[tuple[str, float | None]] | None = None  # a scale set's at MAX instances

    @property
    def monthly_total(self) -> float | None:
        return _total(self.costs)

    @property
    def monthly_total_at_max(self) -> float | None:
        return _total(self.max_costs) if self.max_costs is not None else None


def _total(costs: list[tuple[str, float | None]]) -> float | None:
    if any(c is None for _, c in costs):
        return None
    return round(sum(c for _, c in costs if c is not None), 2)


def _monthly(per_hour: float) -> float:
    return round(per_hour * HOURS_PER_MONTH, 2)


def _sources(sources: tuple[str, ...], fallback: str) -> str:
    return ", ".join(sources) if sources else fallback


CERT_LINES = {
    "acme": "certificate: Let's Encrypt (publicly trusted), obtained and renewed by Caddy on the VM",
    "acme-http": "certificate: Let's Encrypt (publicly trusted) through the HTTP challenge on port 80; "
    "the chat port stays private",
    "internal": "certificate: from Caddy's own authority on the VM (a public one cannot reach a private VM "
    "to check it): encrypted, but browsers warn until you trust its root, which deploy-azure "
    "saves; --trusted-cert opens port 80 for a Let's Encrypt one",
    "provided": "certificate: one for every instance, delivered with the secrets (generated with its own "
    "CA, whose root deploy-azure saves, or yours from --tls-cert/--tls-key); no ACME per instance",
}


def _times(n: int, cost: float | None) -> float | None:
    return None if cost is None else round(n * cost, 2)


def make_scale_plan(d: Deployment) -> Plan:
    """A scale set's plan (--instances): its parts, exposure, and cost at MIN and at MAX instances."""
    low, high = d.instances
    single = make_plan(dataclasses.replace(d, instances=(0, 0)), cert_line=False)
    resources = [
        ("Resource group", d.group, f"{d.region}, tags app={APP_TAG} deployment={d.name}"),
        (
            "Network security group",
            d.nsg,
            f"inbound TCP {d.port} and 80 as below, plus the load balancer's probe (AzureLoadBalancer)"
            + (" and 22" if d.ssh else ""),
        ),
        (
            "Virtual network",
            d.vnet,
            f"{VNET_PREFIX}, subnets {d.subnet} {SUBNET_PREFIX} (instances) and {d.db_subnet} "
            f"{DB_SUBNET_PREFIX} (delegated to PostgreSQL)",
        ),
        ("Public IP (Standard, static)", d.public_ip, f"DNS {d.fqdn}, the load balancer's"),
        (
            "Load balancer (Standard, public)",
            d.lb,
            f"TCP {d.port} and 80, HTTPS probe on /api/health, client-IP affinity (SourceIP)",
        ),
        ("NAT gateway", d.nat, f"outbound for the instances (pulling the image), public IP {d.nat_ip}"),
        ("Public IP (Standard, static)", d.nat_ip, "the NAT gateway's outbound address"),
        (
            "VM scale set (Flexible)",
            d.vmss,
            f"{low} to {high} x {d.size}, Ubuntu 24.04 LTS Gen2, no public IP per instance, rolling upgrades "
            "one instance at a time, automatic repair on the Application Health extension (/api/health)",
        ),
        ("Managed OS disks", f"{d.vmss}_*", f"{d.disk_gb} GiB Standard SSD per instance, deleted with it"),
        ("Autoscale setting", d.autoscale, f"average CPU: +1 above 70 %, -1 below 25 %, {low} to {high}"),
        (
            "PostgreSQL flexible server",
            d.db_server,
            "Burstable B1ms, 32 GiB, PostgreSQL 16, private access only (delegated subnet), TLS required",
        ),
        ("Private DNS zone", d.db_zone, f"the database's name inside {d.vnet} (linked to it)"),
    ]
    exposure = single.exposure[:2] + [CERT_LINES["provided"]] + single.exposure[2:]
    exposure.insert(-1, "the instances themselves: no public IP; reachable only through the load balancer")

    def costs(n: int) -> list[tuple[str, float | None]]:
        return [
            (f"VMs {d.size}, one per instance (running all month)", _times(n, monthly_price(d.size))),
            (f"OS disks {d.disk_gb} GiB Standard SSD, one per instance", _times(n, disk_price(d.disk_gb))),
            ("Load balancer (Standard, 2 rules; plus $0.005/GB)", _monthly(LOAD_BALANCER_PER_HOUR)),
            ("Standard static public IP (load balancer)", _monthly(PUBLIC_IP_PER_HOUR)),
            ("NAT gateway (plus $0.045/GB)", _monthly(NAT_GATEWAY_PER_HOUR)),
            ("Standard static public IP (NAT gateway)", _monthly(PUBLIC_IP_PER_HOUR)),
            ("PostgreSQL flexible server B1ms", _monthly(POSTGRES_B1MS_PER_HOUR)),
            ("PostgreSQL storage 32 GiB", round(32 * POSTGRES_STORAGE_GB_MONTH, 2)),
            ("Private DNS zone", PRIVATE_DNS_ZONE_PER_MONTH),
            ("Autoscale setting", 0.0),
        ]

    return Plan(d, resources, exposure, costs(low), costs(high))


def make_plan(d: Deployment, cert_line: bool = True) -> Plan:
    """Describe what `deploy` will create for `d`; needs no credentials and sends nothing anywhere."""
    if d.scale_set:
        return make_scale_plan(d)
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
        if cert_line:
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
    what = (
        f"a scale set of {d.instances[0]} to {d.instances[1]} {d.size} VMs behind a load balancer"
        if d.scale_set
        else f"a {d.size} VM"
    )
    lines = [
        f"Deployment {d.name!r}: image {d.image} on {what} in {d.region}",
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

    def money(cost: float | None) -> str:
        return f"${cost:.2f}" if cost is not None else "unknown size: see the Azure pricing calculator"

    total = plan.monthly_total
    if plan.max_costs is None:
        for part, cost in plan.costs:
            lines.append(f"  - {part}: {money(cost)}")
        lines.append(f"  = about ${total:.2f} a month" if total is not None else "  = total unknown")
    else:
        low, high = d.instances
        for (part, cost), (_, cost_max) in zip(plan.costs, plan.max_costs, strict=True):
            both = money(cost) if cost == cost_max else f"{money(cost)} at {low}, {money(cost_max)} at {high}"
            lines.append(f"  - {part}: {both}")
        top = plan.monthly_total_at_max
        lines.append(
            f"  = about ${total:.2f} a month at {low}, ${top:.2f} at {high}"
            if total is not None and top is not None
            else "  = total unknown"
        )
    lines.append("  A stopped (deallocated) VM still bills its disk and IP; destroy-azure stops all billing.")
    # The access token has its own lines in the deploy's output (shown once, or where it is kept).
    settings = {k: v for k, v in shown(d.env).items() if k != "ACCESS_TOKEN"}
    if settings:
        lines += ["", "Service settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))]
    return lines
