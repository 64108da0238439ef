"""A scale-set deployment (`--instances MIN[-MAX]`) over the Azure SDK: create or converge it, its
status per instance, an instance's log, and its teardown. The bodies are infra/azure/scale_arm.py's.

The request sequence of a first deploy (each PUT a long-running operation waited for, except the
autoscale setting's, which ARM answers at once):

    resource group → NSG → NAT public IP → NAT gateway → virtual network (two subnets) → public IP
    → load balancer → private DNS zone → its link to the network → PostgreSQL server → its TLS setting
    → its database → scale set (with the extensions) → autoscale setting

A re-deploy sends the same PUTs for the network (idempotent: unchanged resources stay as they are),
leaves the database server alone unless its password must change, and the scale set alone unless its
model changed (a fingerprint in its tags); its capacity is then whatever autoscale made it, kept
within the new MIN..MAX. Unlike one VM, the scale set's first-boot data can change: it applies to the
instances made after, while the running ones get the new image and settings through the extension,
which the rolling upgrade policy applies one instance at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute.models import Sku

from infra import health
from infra.azure import capacity, remote, state
from infra.azure.arm import HTTPS_RULE, SECRETS_EXTENSION, TLS_TAG, public_ip_body
from infra.azure.credentials import AzureClients
from infra.azure.deployment import DB_NAME, DB_PASSWORD_KEY, Deployment, Names, Prepared
from infra.azure.errors import AzureActionError, explain
from infra.azure.provision import (
    DeployResult,
    Progress,
    Status,
    _explained,
    _json,
    _quiet,
    check_capacity,
    existing_group,
    owned_group,
    read_address,
)
from infra.azure.scale_arm import (
    MODEL_TAG,
    POOL,
    autoscale_body,
    database_url,
    db_database_body,
    db_server_body,
    db_tls_body,
    dns_link_body,
    dns_zone_body,
    lb_body,
    nat_body,
    nat_ip_body,
    resource_id,
    scale_nsg_body,
    scale_vnet_body,
    vmss_body,
)
from infra.health import Health, probe
from infra.settings import DATABASE_SETTING
from infra.vm import cloudinit

KIND_TAG = "qwen-box-kind"  # on the resource group: "scale-set" (one VM's group has none)
SCALE_SET = "scale-set"
VMSS = "Microsoft.Compute/virtualMachineScaleSets"
RUNNABLE_DB = {"ready", "starting", "stopping", "stopped", "updating"}  # a server's states worth keeping


def _clients(clients: AzureClients) -> tuple[Any, Any, Any]:
    if clients.monitor is None or clients.postgres is None or clients.private_dns is None:
        raise AzureActionError("a scale set needs the monitor, PostgreSQL and private DNS clients")
    return clients.monitor, clients.postgres, clients.private_dns


def is_scale_set(tags: dict[str, str] | None) -> bool:
    return (tags or {}).get(KIND_TAG) == SCALE_SET


def find_vmss(clients: AzureClients, names: Names) -> Any:
    try:
        return clients.compute.virtual_machine_scale_sets.get(names.group, names.vmss)
    except ResourceNotFoundError:
        return None


def provision(
    clients: AzureClients, prepared: Prepared, ssh_key: str, progress: Progress = _quiet
) -> DeployResult:
    """Create or converge every resource of a scale-set deployment; see the module's docstring."""
    d = prepared.deployment
    tls = prepared.tls
    if tls is None:
        raise AzureActionError("internal: a scale set is prepared with its certificate")
    monitor, postgres, private_dns = _clients(clients)
    sub, net = clients.subscription, clients.network
    with _explained(clients, d):
        group = owned_group(clients, d)
        if group is not None and not is_scale_set(group.tags):
            raise AzureActionError(
                f"deployment {d.name} is one VM, not a scale set: it cannot become one in place. "
                f"`invoke destroy-azure --name {d.name}`, then deploy again with --instances (or choose "
                "another --name)."
            )
        existing = find_vmss(clients, d)
        if existing is not None and not prepared.token_given and not state.load_token(d.name):
            raise AzureActionError(
                f"the scale set {d.vmss} exists but this machine does not keep its access token, and "
                "every instance must share one: give it with --token or QWEN_BOX_ACCESS_TOKEN"
            )
        held = None
        if existing is not None and existing.sku is not None:
            held = capacity.Held(str(existing.sku.name or ""), int(existing.sku.capacity or 0))
        check_capacity(clients, d, count=d.instances[1], held=held)  # autoscale may reach MAX
        token_changed = existing is not None and state.load_token(d.name) != prepared.token
        state.save_token(d.name, prepared.token)  # kept here before any instance has it
        if tls.generated:
            state.save_tls(d.name, tls.as_dict())
            state.save_ca(d.name, tls.ca)
        progress(f"resource group {d.group}")
        clients.resources.resource_groups.create_or_update(
            d.group, _json({"location": d.region, "tags": {**d.tags, KIND_TAG: SCALE_SET}})
        )
        progress(f"network security group {d.nsg}")
        nsg = net.network_security_groups.begin_create_or_update(
            d.group, d.nsg, _json(scale_nsg_body(d))
        ).result()
        progress(f"NAT gateway {d.nat} and its public IP {d.nat_ip} (outbound: pulling the image)")
        nat_ip = net.public_ip_addresses.begin_create_or_update(
            d.group, d.nat_ip, _json(nat_ip_body(d))
        ).result()
        nat = net.nat_gateways.begin_create_or_update(
            d.group, d.nat, _json(nat_body(d, str(nat_ip.id)))
        ).result()
        progress(f"virtual network {d.vnet} (subnets {d.subnet} and {d.db_subnet})")
        vnet = net.virtual_networks.begin_create_or_update(
            d.group, d.vnet, _json(scale_vnet_body(d, str(nat.id)))
        ).result()
        subnets = {s.name: str(s.id) for s in vnet.subnets or []}
        progress(f"public IP {d.public_ip} ({d.fqdn})")
        pip = net.public_ip_addresses.begin_create_or_update(
            d.group, d.public_ip, _json(public_ip_body(d))
        ).result()
        fqdn = pip.dns_settings.fqdn if pip.dns_settings and pip.dns_settings.fqdn else d.fqdn
        if fqdn.lower() != d.fqdn.lower():
            raise AzureActionError(
                f"the public IP's DNS name is {fqdn}, not {d.fqdn} as the certificate says"
            )
        progress(f"load balancer {d.lb} (443 and 80, probe /api/health, client-IP affinity)")
        lb_id = resource_id(sub, d.group, "Microsoft.Network/loadBalancers", d.lb)
        net.load_balancers.begin_create_or_update(
            d.group, d.lb, _json(lb_body(d, lb_id, str(pip.id)))
        ).result()
        progress(f"private DNS zone {d.db_zone} and its link to {d.vnet}")
        zone = private_dns.private_zones.begin_create_or_update(
            d.group, d.db_zone, _json(dns_zone_body(d))
        ).result()
        private_dns.virtual_network_links.begin_create_or_update(
            d.group, d.db_zone, d.vnet, _json(dns_link_body(d, str(vnet.id)))
        ).result()
        db_fqdn = _database(clients, postgres, prepared, subnets[d.db_subnet], str(zone.id), progress)
        env = {**d.env, DATABASE_SETTING: database_url(db_fqdn, prepared.database_password)}
        target = d.with_env(env)
        vmss = _scale_set(
            clients, target, existing, subnets[d.subnet], lb_id, str(nsg.id), ssh_key, prepared, progress
        )
        progress(f"autoscale {d.autoscale} (CPU, {d.instances[0]} to {d.instances[1]} instances)")
        monitor.autoscale_settings.create_or_update(
            d.group, d.autoscale, _json(autoscale_body(d, str(vmss.id)))
        )
    return DeployResult(
        url=d.url,
        fqdn=fqdn,
        ip=pip.ip_address or "",
        vm_created=existing is None,
        container_updated=False,
        token_changed=token_changed,
        rollout_tag=str((vmss.tags or {}).get(MODEL_TAG, ""))
        if existing is not None and vmss is not existing
        else "",
    )


def _database(
    clients: AzureClients, postgres: Any, prepared: Prepared, subnet_id: str, zone_id: str, progress: Progress
) -> str:
    """The PostgreSQL server (created once; its password set again only when this machine does not keep
    the one it has), TLS required, and the service's database; returns the server's DNS name."""
    d = prepared.deployment
    try:
        server = postgres.servers.get(d.group, d.db_server)
    except ResourceNotFoundError:
        server = None
    kept = state.load_secret(d.name, DB_PASSWORD_KEY) == prepared.database_password
    # A server whose creation failed is not Ready (nor stopped or busy): it is sent again.
    now = getattr(server, "state", None)
    failed = server is not None and str(getattr(now, "value", now) or "").lower() not in RUNNABLE_DB
    if server is None or not kept or failed:
        state.save_secret(d.name, DB_PASSWORD_KEY, prepared.database_password)
        progress(f"PostgreSQL flexible server {d.db_server} (Burstable B1ms; takes a few minutes)")
        body = db_server_body(d, subnet_id, zone_id, prepared.database_password)
        server = postgres.servers.begin_create_or_update(d.group, d.db_server, _json(body)).result()
    else:
        progress(f"PostgreSQL flexible server {d.db_server} (unchanged)")
    postgres.configurations.begin_put(
        d.group, d.db_server, "require_secure_transport", _json(db_tls_body())
    ).result()
    postgres.databases.begin_create(d.group, d.db_server, DB_NAME, _json(db_database_body())).result()
    return str(server.fully_qualified_domain_name or f"{d.db_server}.postgres.database.azure.com")


def _scale_set(
    clients: AzureClients,
    d: Deployment,
    existing: Any,
    subnet_id: str,
    lb_id: str,
    nsg_id: str,
    ssh_key: str,
    prepared: Prepared,
    progress: Progress,
) -> Any:
    """PUT the scale set when it is new, failed, or its model changed; else leave it as it is."""
    assert prepared.tls is not None
    tls = (prepared.tls.cert, prepared.tls.key)
    low, high = d.instances
    capacity = low
    if existing is not None:
        capacity = min(max(int(existing.sku.capacity or low), low), high)
    body = vmss_body(
        d,
        subnet_id=subnet_id,
        pool_id=f"{lb_id}/backendAddressPools/{POOL}",
        nsg_id=nsg_id,
        ssh_key=ssh_key,
        custom_data_b64=cloudinit.custom_data(prepared.cloud_init),
        capacity=capacity,
        tls=tls,
    )
    if existing is not None:
        tags = dict(existing.tags or {})
        same = (
            tags.get(MODEL_TAG) == body["tags"][MODEL_TAG]
            and str(existing.sku.name).lower() == d.size.lower()
            and int(existing.sku.capacity or 0) == capacity
            and str(existing.provisioning_state or "").lower() != "failed"
        )
        if tags.get(TLS_TAG, "provided") != d.cert:
            raise AzureActionError(
                f"{d.vmss} was created with another certificate mode; destroy and deploy again"
            )
        if same:
            progress(f"scale set {d.vmss} (unchanged, {capacity} instances)")
            return existing
        progress(f"scale set {d.vmss} (converging: rolled out one instance at a time)")
    else:
        progress(f"scale set {d.vmss} ({capacity} x {d.size}, Flexible orchestration)")
    return clients.compute.virtual_machine_scale_sets.begin_create_or_update(
        d.group, d.vmss, _json(body)
    ).result()


# -- status, logs, destroy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance(Names):
    """One instance of the scale set, named as remote.py's functions want a VM (`vm`)."""

    instance: str = ""

    @property
    def vm(self) -> str:
        return self.instance


def instances(clients: AzureClients, names: Names) -> list[str]:
    """The scale set's VMs by name (Flexible orchestration: ordinary VMs that name the scale set)."""
    vmss_id = resource_id(clients.subscription, names.group, VMSS, names.vmss).lower()
    found = []
    for vm in clients.compute.virtual_machines.list(names.group):
        owner = getattr(vm, "virtual_machine_scale_set", None)
        if owner is not None and str(owner.id).lower() == vmss_id:
            found.append(str(vm.name))
    return sorted(found)


def instance_health(clients: AzureClients, names: Names, vm: str) -> tuple[str, str]:
    """(power state, health) of one instance, from its instance view (health: the Application Health
    extension's verdict, "unknown" before it has one)."""
    view = clients.compute.virtual_machines.instance_view(names.group, vm)
    power = "unknown"
    for s in view.statuses or []:
        parts = (s.code or "").split("/")
        if parts[0] == "PowerState" and len(parts) > 1:
            power = parts[1]
    verdict = "unknown"
    if view.vm_health and view.vm_health.status and view.vm_health.status.code:
        verdict = view.vm_health.status.code.split("/")[-1]
    return power, verdict


def status(
    clients: AzureClients, names: Names, probe_health: bool = True, ca_file: str = ""
) -> Status | None:
    """The scale set's capacity, each instance's power and health, the address and exposure, and the
    service's health through the load balancer."""
    group = existing_group(clients, names)
    if group is None:
        return None
    st = Status(name=names.name, region=group.location)
    try:
        vmss = clients.compute.virtual_machine_scale_sets.get(names.group, names.vmss)
        sku = vmss.sku or Sku()
        st.size = str(sku.name)
        st.cert = (vmss.tags or {}).get(TLS_TAG, "provided")
        if clients.monitor is not None:
            try:
                auto = clients.monitor.autoscale_settings.get(names.group, names.autoscale)
                cap = auto.profiles[0].capacity
                st.capacity = f"{sku.capacity} (autoscale {cap.minimum} to {cap.maximum})"
            except ResourceNotFoundError:
                st.capacity = f"{sku.capacity} (no autoscale setting: re-run deploy-azure)"
        for vm in instances(clients, names):
            power, verdict = instance_health(clients, names, vm)
            st.instances.append((vm, power, verdict))
        st.power = "failed to provision" if str(vmss.provisioning_state).lower() == "failed" else "running"
        read_address(clients, names, st, served_by=(HTTPS_RULE,))
    except ResourceNotFoundError:
        st.power = st.power or "incomplete (re-run deploy-azure)"
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc
    if probe_health and st.ip and st.power == "running":
        st.health = probe(st.ip, st.port, tls=True, server_name=st.fqdn, verify=ca_file or False)
    return st


def behind(clients: AzureClients, names: Names, tag: str) -> tuple[list[str], list[str]]:
    """(all instances, those not yet running the model of `tag`): an instance runs it once its secrets
    extension (which carries the image and settings) has the model's forceUpdateTag and succeeded."""
    found = instances(clients, names)
    stale = []
    for vm in found:
        try:
            ext = clients.compute.virtual_machine_extensions.get(names.group, vm, SECRETS_EXTENSION)
        except ResourceNotFoundError:
            stale.append(vm)
            continue
        done = str(ext.provisioning_state or "").lower() == "succeeded"
        if ext.force_update_tag != tag or not done:
            stale.append(vm)
    return found, stale


def pick_instance(clients: AzureClients, names: Names, which: str) -> Instance:
    """--instance N (its place in status-azure's list, from 0) or its name; the first without one."""
    found = instances(clients, names)
    if not found:
        raise AzureActionError(
            f"the scale set {names.vmss} has no instances (status-azure shows its capacity)"
        )
    if not which:
        return Instance(names.name, instance=found[0])
    if which.isdigit():
        if int(which) >= len(found):
            raise AzureActionError(
                f"--instance {which}: the scale set has {len(found)} (0 to {len(found) - 1})"
            )
        return Instance(names.name, instance=found[int(which)])
    if which not in found:
        raise AzureActionError(f"--instance {which}: not one of {', '.join(found)}")
    return Instance(names.name, instance=which)


class ScaleSet:
    """The Target of a scale-set deployment (infra/azure/target.py)."""

    def __init__(self, clients: AzureClients):
        self.clients = clients

    def provision(self, prepared: Prepared, ssh_key: str, progress: Progress) -> DeployResult:
        return provision(self.clients, prepared, ssh_key, progress)

    def wait_ready(
        self,
        prepared: Prepared,
        result: DeployResult,
        on_phase: Callable[[Health], None],
        on_poll: Callable[[Health, float], None],
    ) -> Health:
        """Poll the load balancer's address as the deployment's name, checking the certificate against the
        generated CA's root (or the system's CAs for the user's own): ready once an instance is.

        After a model change (a new image or settings), the instances that still answer are the old
        ones, so the address is ready at once: then it also waits until the rolling upgrade has reached
        every instance (`behind`), within the same timeout, and says which have not."""
        d, options = prepared.deployment, prepared.options
        started = time.monotonic()
        ca = state.ca_file(d.name)
        verify: bool | str = str(ca) if prepared.tls and prepared.tls.generated else True
        answer = health.wait_healthy(
            result.ip,
            d.port,
            timeout=options.timeout,
            interval=options.interval,
            on_phase=on_phase,
            on_poll=on_poll,
            probe_timeout=min(5.0, max(options.interval, 0.5)),
            tls=True,
            server_name=result.fqdn,
            verify=verify,
        )
        if answer.phase != "ok" or not result.rollout_tag:
            return answer
        return self._wait_rollout(
            d, result.rollout_tag, answer, started, options.timeout, options.interval, on_phase, on_poll
        )

    def _wait_rollout(
        self,
        names: Names,
        tag: str,
        answer: Health,
        started: float,
        timeout: float,
        interval: float,
        on_phase: Callable[[Health], None],
        on_poll: Callable[[Health, float], None],
    ) -> Health:
        """Until every instance runs the model of `tag` (answer: the address's ok), or the timeout."""
        told = ""
        while True:
            try:
                found, stale = behind(self.clients, names, tag)
            except HttpResponseError as exc:
                raise AzureActionError(explain(exc, name=names.name)) from exc
            if not stale:
                return answer
            now = Health("updating", f"{len(found) - len(stale)} of {len(found)} instances run the new model")
            if now.detail != told:
                told = now.detail
                on_phase(now)
            elapsed = time.monotonic() - started
            on_poll(now, elapsed)
            if elapsed >= timeout:
                return Health(
                    "stopped",
                    f"the new image and settings have not reached every instance after {int(elapsed)} s: "
                    f"{', '.join(stale)} still run the old ones (the rolling upgrade goes one instance at "
                    "a time; see status-azure, and logs-azure --instance NAME)",
                )
            time.sleep(min(max(interval, 0.05), max(timeout - elapsed, 0.05)))

    def status(self, names: Names, ca_file: str = "") -> Status | None:
        return status(self.clients, names, ca_file=ca_file)

    def destroy(self, names: Names, progress: Progress) -> bool:
        """The resource group with everything in it (the database too), VMs force-deleted."""
        groups = self.clients.resources.resource_groups
        try:
            if owned_group(self.clients, names) is None:
                return False
            progress(f"deleting resource group {names.group} and everything in it")
            groups.begin_delete(
                names.group, force_deletion_types=f"Microsoft.Compute/virtualMachines,{VMSS}"
            ).result()
        except HttpResponseError as exc:
            raise AzureActionError(explain(exc, name=names.name)) from exc
        return True

    def logs(self, names: Names, lines: int, instance: str = "") -> str:
        try:
            chosen = pick_instance(self.clients, names, instance)
        except HttpResponseError as exc:
            raise AzureActionError(explain(exc, name=names.name)) from exc
        return f"[{chosen.vm}]\n" + remote.container_logs(self.clients, chosen, lines)

    def diagnostics(self, names: Names) -> list[tuple[str, str]]:
        try:
            chosen = pick_instance(self.clients, names, "")
        except (AzureActionError, HttpResponseError) as exc:
            return [("Scale set", f"no instance to ask: {exc}")]
        return [(f"{title} ({chosen.vm})", text) for title, text in remote.diagnostics(self.clients, chosen)]

    def root_certificate(self, names: Names) -> str:
        return state.ca_file(names.name).read_text()
