"""Provisioning over the Azure SDK: create or converge a deployment's resources, find its status,
destroy it. The clients (`AzureClients`) come in as a parameter: the CLI builds them from the user's
credential, the tests against a fake ARM on loopback that speaks the real REST protocol.

State lives in Azure, found by names derived from the deployment name (and the `app=qwen-box` tag),
so status and destroy work from any machine. A VM's first-boot data (custom_data) cannot change after
it is created, so a re-deploy converges an existing VM in place: size and tags by PUT, the container by
Run Command (infra/azure/remote.py), refusing up front what cannot change in place. Secrets never go in
custom_data: they follow the VM in the Custom Script extension's protected settings (deliver_secrets).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute.models import VirtualMachine
from azure.mgmt.resource.resources.models import ResourceGroup

from infra.azure import capacity, state
from infra.azure.arm import (
    CONFIG_TAG,
    DELIVERY_TAG,
    HTTP_RULE,
    HTTPS_RULE,
    REGISTRY_TAG,
    SECRETS_EXTENSION,
    SECRETS_TAG,
    TLS_TAG,
    Body,
    nic_body,
    nsg_body,
    public_ip_body,
    secrets_extension_body,
    vm_body,
    vm_tags,
    vnet_body,
)
from infra.azure.credentials import AzureClients
from infra.azure.deployment import APP_TAG, INTERNET, Deployment, Names, Prepared, site_url
from infra.azure.errors import SUGGESTED_SIZES, AzureActionError, error_code, explain
from infra.azure.remote import VmState, failed_vm_advice, power_state, run_command, vm_state
from infra.azure.sizes import check_vm
from infra.fit import default_precision
from infra.health import Health, probe
from infra.vm import cloudinit

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _json(body: Body) -> Any:
    """An ARM body as the SDK takes it: its typed overloads name only models and byte streams, but it
    sends a dict as the JSON it is, which keeps the bodies readable as Azure's REST reference."""
    return body


@dataclass(frozen=True)
class DeployResult:
    """Where the deployment answers and what this run did to the VM."""

    url: str
    fqdn: str
    ip: str
    vm_created: bool
    container_updated: bool
    token_changed: bool = False  # an existing VM was given another access token (--token)
    # a scale set whose model changed: the secrets extension's forceUpdateTag each instance carries once
    # the rollout has reached it (wait_ready waits for every instance); "" when nothing rolls out
    rollout_tag: str = ""


@contextmanager
def _explained(clients: AzureClients, d: Deployment) -> Iterator[None]:
    """Azure's refusals as AzureActionError with a sentence saying what to do (infra/azure/errors.py)."""
    try:
        yield
    except HttpResponseError as exc:
        raise AzureActionError(
            explain(
                exc,
                region=d.region,
                size=d.size,
                name=d.name,
                available_sizes=lambda: available_sizes(clients, d.region),
            )
        ) from exc


def available_sizes(clients: AzureClients, region: str) -> list[str]:
    """VM sizes this subscription may use in `region`, from the resource SKU list (for suggestions)."""
    usable: set[str] = set()
    for sku in clients.compute.resource_skus.list(filter=f"location eq '{region}'"):
        if (
            sku.resource_type == "virtualMachines"
            and not any(r.type == "Location" for r in (sku.restrictions or []))
            and sku.name
        ):
            usable.add(sku.name)
    preferred = [s for s in SUGGESTED_SIZES if s in usable]
    return preferred + sorted(usable - set(preferred))


def check_owned(names: Names, tags: Mapping[str, str] | None) -> None:
    """Refuse a resource group that is not this deployment's: it must carry app=qwen-box and
    deployment=NAME (tag names compare case-insensitively, as in Azure). A group of the same name made by
    someone else, or by another deployment, is never changed, described or deleted."""
    found = {k.lower(): v for k, v in (tags or {}).items()}
    if found.get("app") == APP_TAG and found.get("deployment") == names.name:
        return
    shown = ", ".join(f"{k}={v}" for k, v in sorted((tags or {}).items())) or "no tags at all"
    raise AzureActionError(
        f"resource group {names.group} is not qwen-box deployment {names.name}: it carries {shown}, not "
        f"app={APP_TAG} and deployment={names.name}. Nothing was changed. If it is not yours, choose "
        f"another --name; if it is a qwen-box deployment that lost its tags, tag it again "
        f"(`az group update --name {names.group} --tags app={APP_TAG} deployment={names.name}`)."
    )


# A 404 that means "no such group"; any other (SubscriptionNotFound: a wrong --subscription) is an
# error to explain, not an absent deployment ("Nothing to delete" and exit 0 hid a typo).
GROUP_ABSENT = ("ResourceGroupNotFound", "ResourceNotFound", "HTTP404")


def owned_group(clients: AzureClients, names: Names) -> ResourceGroup | None:
    """The deployment's resource group (None when there is none), refused if it is not ours
    (check_owned). Every action on an existing deployment starts here."""
    try:
        group = clients.resources.resource_groups.get(names.group)
    except ResourceNotFoundError as exc:
        if error_code(exc) not in GROUP_ABSENT:  # the subscription itself (SubscriptionNotFound)
            raise
        return None
    check_owned(names, group.tags)
    return group


def existing_group(clients: AzureClients, names: Names) -> ResourceGroup | None:
    """`owned_group`, with Azure's refusals told in the deployment's terms (what status shows)."""
    try:
        return owned_group(clients, names)
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc


def vm_size(vm: VirtualMachine) -> str:
    size = vm.hardware_profile.vm_size if vm.hardware_profile else ""
    return str(getattr(size, "value", size) or "")


def fits_model(d: Deployment) -> Callable[[str], bool]:
    """Whether a size has room for the deployment's model (sizes.check_vm; unknown sizes pass)."""
    precision = d.env.get("DTYPE") or default_precision()
    return lambda size: check_vm(d.model, precision, size).fits


def check_capacity(
    clients: AzureClients, d: Deployment, count: int = 1, held: capacity.Held | None = None
) -> None:
    """Refuse, before the first PUT, a size the region does not offer this subscription or one over
    its vCPU quota (infra/azure/capacity.py); `held` is what an existing deployment already runs."""
    capacity.check(clients, d.region, d.size, count, held, suitable=fits_model(d))


def find_vm(clients: AzureClients, names: Names) -> VirtualMachine | None:
    """The deployment's VM, or None when there is none yet."""
    try:
        return clients.compute.virtual_machines.get(names.group, names.vm)
    except ResourceNotFoundError:
        return None


def _usable_vm(clients: AzureClients, d: Deployment, progress: Progress) -> VirtualMachine | None:
    """The deployment's VM to converge, or None when one must be created: none yet, or one whose
    creation failed (provisioningState Failed, e.g. AllocationFailed), which is deleted first.

    A failed VM never ran, and what it was created with (custom_data) is fixed, so converging it in
    place cannot help; deleting it takes its NIC and OS disk (deleteOption Delete) but not the public
    IP, so the recreated VM keeps its address and DNS name. Refuses a group that is not ours.
    """
    owned_group(clients, d)
    vm = find_vm(clients, d)
    check_capacity(clients, d, held=capacity.Held(vm_size(vm), 1) if vm is not None else None)
    if vm is None or (vm.provisioning_state or "").lower() != "failed":
        return vm
    state = vm_state(clients, d)
    why = state.failure or "provisioningState Failed"
    progress(f"{d.vm} failed to provision ({why}): deleting it to create it again (the public IP stays)")
    clients.compute.virtual_machines.begin_delete(d.group, d.vm).result()
    return None


def provision(
    clients: AzureClients, prepared: Prepared, ssh_key: str, progress: Progress = _quiet
) -> DeployResult:
    """deploy-azure's provisioning phase: look the VM up (once), then create or converge everything.

    A new VM is created with the prepared cloud-init, and its access token is kept on this machine
    first, so no VM ever holds a token this machine has lost. An existing VM keeps the token it was
    created with (see Prepared.for_existing_vm).
    """
    d = prepared.deployment
    with _explained(clients, d):
        existing = _usable_vm(clients, d, progress)
    if existing is None:
        state.save_token(d.name, prepared.token)
        return converge(clients, d, prepared.cloud_init, ssh_key, None, progress)
    target = prepared.for_existing_vm
    with _explained(clients, d):
        if not secrets_delivered(clients, d, existing):
            target = d  # its first delivery failed: the VM still waits for the token this machine kept
    token_changed = "ACCESS_TOKEN" in target.env and secrets_changed(target, existing)
    if token_changed:
        state.save_token(d.name, prepared.token)  # kept here before the VM has it, as for a new VM
    result = converge(clients, target, prepared.cloud_init, ssh_key, existing, progress)
    return dataclasses.replace(result, token_changed=token_changed)


def deploy(
    clients: AzureClients, d: Deployment, cloud_init_text: str, ssh_key: str, progress: Progress = _quiet
) -> DeployResult:
    """Create or converge every resource of `d` from its rendered cloud-init: `provision` without the
    token keeping, for a `Deployment` made by hand."""
    with _explained(clients, d):
        existing = _usable_vm(clients, d, progress)
    return converge(clients, d, cloud_init_text, ssh_key, existing, progress)


def converge(
    clients: AzureClients,
    d: Deployment,
    cloud_init_text: str,
    ssh_key: str,
    existing: VirtualMachine | None,
    progress: Progress = _quiet,
) -> DeployResult:
    """Create or converge every resource of `d`; safe to re-run (same names, PUT semantics).

    `existing` is the VM as found (None: create it with `cloud_init_text`). custom_data is immutable
    afterwards, so a re-run with another image or settings updates the running container through
    run-command instead, and records what runs in a tag so an unchanged re-run does nothing to the VM.
    """
    net, compute = clients.network, clients.compute
    with _explained(clients, d):
        if existing is not None:
            _refuse_fixed_changes(d, dict(existing.tags or {}))
        progress(f"resource group {d.group}")
        clients.resources.resource_groups.create_or_update(
            d.group, _json({"location": d.region, "tags": d.tags})
        )
        progress(f"network security group {d.nsg}")
        nsg = net.network_security_groups.begin_create_or_update(d.group, d.nsg, _json(nsg_body(d))).result()
        progress(f"virtual network {d.vnet}")
        vnet = net.virtual_networks.begin_create_or_update(d.group, d.vnet, _json(vnet_body(d))).result()
        progress(f"public IP {d.public_ip}")
        pip = net.public_ip_addresses.begin_create_or_update(
            d.group, d.public_ip, _json(public_ip_body(d))
        ).result()
        fqdn = pip.dns_settings.fqdn if pip.dns_settings and pip.dns_settings.fqdn else d.fqdn
        if d.tls and fqdn.lower() != d.fqdn.lower():
            raise AzureActionError(
                f"the public IP's DNS name is {fqdn}, not {d.fqdn} as the certificate "
                "would say; deploy with --no-tls on this cloud"
            )
        subnet_id = next(s.id for s in vnet.subnets or [] if s.name == d.subnet)
        progress(f"network interface {d.nic}")
        nic = net.network_interfaces.begin_create_or_update(
            d.group, d.nic, _json(nic_body(d, str(subnet_id), str(pip.id), str(nsg.id)))
        ).result()
        if existing is None:
            progress(f"virtual machine {d.vm} ({d.size})")
            body = vm_body(d, str(nic.id), ssh_key, cloudinit.custom_data(cloud_init_text))
            created = compute.virtual_machines.begin_create_or_update(d.group, d.vm, _json(body)).result()
            deliver_secrets(clients, d, progress)
            updated = False
        else:
            updated = _converge_vm(clients, d, existing, progress)
            created = existing
        _tag_os_disk(clients, d, created, progress)
    return DeployResult(
        url=site_url(fqdn, d.port, d.tls),
        fqdn=fqdn,
        ip=pip.ip_address or "",
        vm_created=existing is None,
        container_updated=updated,
    )


def _tag_os_disk(clients: AzureClients, d: Deployment, vm: VirtualMachine, progress: Progress) -> None:
    """Give the OS disk the deployment's tags. Azure creates it with the VM but copies none of the VM's
    tags to it, and an implicit disk's tags cannot be set in the VM's body, so it is updated afterwards
    (also for a VM made before this was done). A disk without them is invisible to a search by tag and
    to cost reports of the deployment."""
    profile = vm.storage_profile
    name = (profile.os_disk.name if profile and profile.os_disk else None) or d.os_disk
    disk = clients.compute.disks.get(d.group, name)
    tags = dict(disk.tags or {})
    if d.tags.items() <= tags.items():
        return
    progress(f"tagging the OS disk {name}")
    clients.compute.disks.begin_update(d.group, name, _json({"tags": {**tags, **d.tags}})).result()


def _refuse_fixed_changes(d: Deployment, old_tags: dict[str, str]) -> None:
    """Refuse, before anything is touched, what an existing VM cannot change.

    HTTPS cannot be added or removed. The certificate's source can change, since that is only Caddy's
    config, and so can the secrets (deliver_secrets).
    """
    was_tls = old_tags.get(TLS_TAG, "off") != "off"
    if was_tls != d.tls:
        then, now = ("HTTPS", "--no-tls") if was_tls else ("plain HTTP", "HTTPS")
        raise AzureActionError(
            f"{d.vm} was created with {then}; it cannot switch to {now} in place. Re-run "
            f"{'with' if not was_tls else 'without'} --no-tls, or `invoke destroy-azure --name {d.name}` and "
            "deploy again."
        )


def _converge_vm(clients: AzureClients, d: Deployment, existing: VirtualMachine, progress: Progress) -> bool:
    """Bring an existing VM to `d`: size and tags by PUT (as `az vm update` does), container by run-command.

    What cannot change in place was refused already (_refuse_fixed_changes).
    """
    compute = clients.compute
    current = existing.as_dict(exclude_readonly=True)
    props = current.setdefault("properties", {})
    old_tags = dict(existing.tags or {})
    tags = vm_tags(d)
    for kept in (SECRETS_TAG, REGISTRY_TAG, DELIVERY_TAG):
        if kept not in tags and kept in old_tags:
            tags[kept] = old_tags[kept]
    changed_size = str(props.get("hardwareProfile", {}).get("vmSize", "")).lower() != d.size.lower()
    new_config = old_tags.get(CONFIG_TAG) != tags[CONFIG_TAG]
    if changed_size:
        progress(f"resizing {d.vm} to {d.size} (the VM restarts)")
    power = power_state(clients, d)
    if power in ("deallocated", "stopped"):
        progress(f"starting {d.vm} (it was {power})")
        compute.virtual_machines.begin_start(d.group, d.vm).result()
    delivered = secrets_delivered(clients, d, existing)
    if secrets_changed(d, existing) or not delivered:
        deliver_secrets(clients, d, progress, retry="" if delivered else str(int(time.time())))
        tags[DELIVERY_TAG] = "extension"
    if new_config:
        progress("updating the container (new image or settings) via run-command")
        out, err = run_command(
            clients, d, cloudinit.update_script(d.image, d.port, d.env, caddyfile=d.caddyfile, model=d.model)
        )
        if cloudinit.UPDATE_DONE not in out:
            detail = "\n".join((err or out).strip().splitlines()[-8:]) or "(no output)"
            raise AzureActionError(
                f"updating the container on {d.vm} failed; it keeps running what it ran before:\n{detail}\n"
                "Fix the cause (the image name, the registry login) and re-run deploy-azure."
            )
    if changed_size or old_tags != tags:
        body: Body = {
            "location": d.region,
            "tags": tags,
            "properties": {
                k: v
                for k, v in props.items()
                if k
                in ("hardwareProfile", "storageProfile", "osProfile", "networkProfile", "diagnosticsProfile")
            },
        }
        body["properties"]["hardwareProfile"] = {"vmSize": d.size}
        progress(f"virtual machine {d.vm} (converging)")
        compute.virtual_machines.begin_create_or_update(d.group, d.vm, _json(body)).result()
    else:
        progress(f"virtual machine {d.vm} (unchanged)")
    return new_config


# -- the secrets: the Custom Script extension's protectedSettings, never custom_data ---------------------


def deliver_secrets(
    clients: AzureClients, d: Deployment, progress: Progress = _quiet, retry: str = ""
) -> None:
    """Send the VM its secret settings and registry login through the Custom Script extension and wait
    until the VM agent has run it (the first boot waits for them before it logs in and starts the
    container). Azure encrypts protectedSettings to the VM's certificate and never returns them.
    """
    progress(f"secrets for {d.vm} (Custom Script extension, protected settings)")
    try:
        clients.compute.virtual_machine_extensions.begin_create_or_update(
            d.group, d.vm, SECRETS_EXTENSION, _json(secrets_extension_body(d, retry))
        ).result()
    except HttpResponseError as exc:
        code = getattr(exc.error, "code", "") or ""
        if code.startswith("VMExtension") or "extension" in str(exc.message or "").lower():
            raise AzureActionError(
                f"the VM agent on {d.vm} could not run the extension that gives it its access token "
                f"({code or 'failed'}: {(exc.message or '').strip()[:300]}). The VM waits for it up to 20 "
                "minutes: re-run deploy-azure to send it again (nothing else is recreated)."
            ) from exc
        raise


def secrets_changed(d: Deployment, existing: VirtualMachine) -> bool:
    """Whether `d` brings secrets (settings or registry login) other than those the VM's tags record."""
    tags = dict(existing.tags or {})
    secrets = cloudinit.secrets_digest(d.name, d.env)
    registry = cloudinit.registry_digest(d.name, d.registry)
    return bool(secrets and secrets != tags.get(SECRETS_TAG)) or bool(
        registry and registry != tags.get(REGISTRY_TAG)
    )


def secrets_delivered(clients: AzureClients, d: Deployment, existing: VirtualMachine) -> bool:
    """False only for a VM that waits for its secrets from the extension (DELIVERY_TAG) whose extension
    is missing or did not succeed; a VM made before the extension was used has them already."""
    if (existing.tags or {}).get(DELIVERY_TAG) != "extension":
        return True
    try:
        ext = clients.compute.virtual_machine_extensions.get(d.group, d.vm, SECRETS_EXTENSION)
    except ResourceNotFoundError:
        return False
    return str(ext.provisioning_state or "").lower() == "succeeded"


@dataclass
class Status:
    """A deployment as found in Azure."""

    name: str
    region: str
    size: str = ""
    power: str = ""
    fqdn: str = ""
    ip: str = ""
    port: int = 80
    cert: str = ""  # infra/vm/caddy.py's certificate mode; "" for plain HTTP
    exposure: list[str] = field(default_factory=list)
    health: Health | None = None
    failure: str = ""  # why the VM's provisioning failed, with the next step ("" if it did not)
    capacity: str = ""  # a scale set's: how many instances now, and autoscale's bounds
    instances: list[tuple[str, str, str]] = field(default_factory=list)  # a scale set's (name, power, health)

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    @property
    def url(self) -> str:
        return site_url(self.fqdn, self.port, self.tls) if self.fqdn else ""


def list_deployments(clients: AzureClients) -> list[tuple[str, str]]:
    """(name, region) of every qwen-box deployment in the subscription, found by tag."""
    groups = clients.resources.resource_groups.list(filter=f"tagName eq 'app' and tagValue eq '{APP_TAG}'")
    found = [((g.tags or {}).get("deployment", ""), g.location) for g in groups]
    return sorted((name, location) for name, location in found if name)


def read_address(clients: AzureClients, names: Names, st: Status, served_by: tuple[str, ...]) -> None:
    """Fills in the deployment's DNS name and IP (its public IP) and, from its NSG, who may reach which
    port; the port of a rule named in `served_by` is the one the service answers on."""
    pip = clients.network.public_ip_addresses.get(names.group, names.public_ip)
    st.fqdn = pip.dns_settings.fqdn if pip.dns_settings else ""
    st.ip = pip.ip_address or ""
    nsg = clients.network.network_security_groups.get(names.group, names.nsg)
    for rule in nsg.security_rules or []:
        sources = rule.source_address_prefixes or [rule.source_address_prefix]
        port = rule.destination_port_range
        if rule.name in served_by and port and port.isdigit():
            st.port = int(port)
        shown = "everyone (Internet)" if INTERNET in sources or "*" in sources else ", ".join(sources)
        st.exposure.append(f"TCP {port} from {shown}")


def status(
    clients: AzureClients, names: Names, probe_health: bool = True, ca_file: str = ""
) -> Status | None:
    """Power state, address, exposure and health of a deployment; None if it does not exist.

    `ca_file` is the root of the VM's own certificate authority (for a private deployment), when saved.
    """
    group = existing_group(clients, names)
    if group is None:
        return None
    st = Status(name=names.name, region=group.location)
    try:
        vm = clients.compute.virtual_machines.get(names.group, names.vm)
        size = vm.hardware_profile.vm_size
        st.size = str(getattr(size, "value", size))
        vm_now = vm_state(clients, names)
        if not vm_now.failed and (vm.provisioning_state or "").lower() == "failed":
            vm_now = VmState(vm_now.power, "Failed")
        st.power = "failed to provision" if vm_now.failed else vm_now.power
        st.failure = failed_vm_advice(names, vm_now) if vm_now.failed else ""
        cert = (vm.tags or {}).get(TLS_TAG, "off")
        st.cert = "" if cert == "off" else cert
        read_address(clients, names, st, served_by=(HTTP_RULE, HTTPS_RULE))
    except ResourceNotFoundError:
        st.power = st.power or "incomplete (re-run deploy-azure)"
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc
    if probe_health and st.ip and st.power == "running":
        verify: bool | str = True if st.cert.startswith("acme") else ca_file or False
        st.health = probe(st.ip, st.port, tls=st.tls, server_name=st.fqdn, verify=verify)
    return st


def destroy(clients: AzureClients, names: Names, progress: Progress = _quiet) -> bool:
    """Delete the deployment's resource group and everything in it; wait until it is gone.

    Returns False if there was nothing to delete; refuses a group that is not ours (check_owned). The
    VM is force-deleted (no graceful shutdown), which is what a teardown wants and is quicker.
    """
    groups = clients.resources.resource_groups
    try:
        if owned_group(clients, names) is None:
            return False
        progress(f"deleting resource group {names.group} and everything in it")
        groups.begin_delete(names.group, force_deletion_types="Microsoft.Compute/virtualMachines").result()
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc
    return True
