"""Azure resources for one qwen-box deployment: deploy (converge), wait, status, logs, diagnostics, destroy.

A small set of functions over the SDK clients in `AzureClients`, which come in as a parameter: the CLI
builds them from the user's credential, the tests build them against a fake ARM on loopback. Request
bodies are the ARM REST JSON itself, so what is sent here reads like Azure's own documentation.

State lives in Azure, found by names derived from the deployment name (and the `app=qwen-box` tag),
so status, logs and destroy work from any machine.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
import urllib3
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from requests.utils import DEFAULT_CA_BUNDLE_PATH
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

from infra import cloudinit
from infra.azure_errors import AzureActionError, explain
from infra.credentials import AzureClients
from infra.plan import (
    ADMIN_USER,
    APP_TAG,
    INTERNET,
    SUBNET_PREFIX,
    UBUNTU_2404,
    VNET_PREFIX,
    Deployment,
    Names,
    site_url,
)

Progress = Callable[[str], None]
CONFIG_TAG = "qwen-box-config"
SECRETS_TAG = "qwen-box-secrets"
TLS_TAG = "qwen-box-tls"  # the certificate mode (infra/caddy.py), "off" for plain HTTP
HTTPS_RULE, REDIRECT_RULE, HTTP_RULE = "allow-chat-https", "allow-http-redirect", "allow-chat-http"
CONTAINER = "qwen-box"
PHASES = {
    "provisioning": "provisioning Azure resources",
    "booting": "booting the VM",
    "installing": "installing Docker",
    "pulling": "pulling the image",
    "starting": "starting the container",
    "loading": "loading the model",
    "ok": "ready",
    "error": "failed",
}
FINAL_PHASES = ("ok", "error")


def _quiet(_: str) -> None:
    pass


# -- request bodies --------------------------------------------------------------------------------


def _rule(name: str, priority: int, port: int, sources: tuple[str, ...], description: str) -> dict:
    props = {
        "priority": priority,
        "direction": "Inbound",
        "access": "Allow",
        "protocol": "Tcp",
        "sourcePortRange": "*",
        "destinationAddressPrefix": "*",
        "destinationPortRange": str(port),
        "description": description,
    }
    if len(sources) == 1:
        props["sourceAddressPrefix"] = sources[0]
    else:
        props["sourceAddressPrefixes"] = list(sources)
    return {"name": name, "properties": props}


def nsg_body(d: Deployment) -> dict:
    """Inbound: the chat port from the allowed sources (or the Internet with --public); with HTTPS also
    port 80, for the redirect and the certificate challenge (see Deployment.redirect_sources); SSH only
    if asked."""
    if not d.http_sources:
        raise AzureActionError("no source address to allow: pass --allow-from CIDR or --public")
    public = " - public" if d.public else ""
    if d.tls:
        rules = [
            _rule(HTTPS_RULE, 100, d.port, d.http_sources, "qwen-box chat (HTTPS)" + public),
            _rule(
                REDIRECT_RULE,
                105,
                80,
                d.redirect_sources,
                "qwen-box: HTTP redirect to HTTPS and certificate challenge (no chat)",
            ),
        ]
    else:
        rules = [_rule(HTTP_RULE, 100, d.port, d.http_sources, "qwen-box chat (HTTP)" + public)]
    if d.ssh:
        ssh_sources = d.ssh_from or d.allow_from
        if not ssh_sources or INTERNET in ssh_sources:
            raise AzureActionError("--ssh needs a source address: pass --allow-from CIDR")
        rules.append(_rule("allow-ssh", 110, 22, ssh_sources, "qwen-box SSH (key only)"))
    return {"location": d.region, "tags": d.tags, "properties": {"securityRules": rules}}


def vnet_body(d: Deployment) -> dict:
    return {
        "location": d.region,
        "tags": d.tags,
        "properties": {
            "addressSpace": {"addressPrefixes": [VNET_PREFIX]},
            "subnets": [{"name": d.subnet, "properties": {"addressPrefix": SUBNET_PREFIX}}],
        },
    }


def public_ip_body(d: Deployment) -> dict:
    """Standard SKU, static, with the DNS label that makes the stable NAME.REGION.cloudapp.azure.com."""
    return {
        "location": d.region,
        "tags": d.tags,
        "sku": {"name": "Standard", "tier": "Regional"},
        "properties": {
            "publicIPAllocationMethod": "Static",
            "publicIPAddressVersion": "IPv4",
            "idleTimeoutInMinutes": 30,
            "dnsSettings": {"domainNameLabel": d.name},
        },
    }


def nic_body(d: Deployment, subnet_id: str, ip_id: str, nsg_id: str) -> dict:
    return {
        "location": d.region,
        "tags": d.tags,
        "properties": {
            "networkSecurityGroup": {"id": nsg_id},
            "ipConfigurations": [
                {
                    "name": "ipconfig1",
                    "properties": {
                        "privateIPAllocationMethod": "Dynamic",
                        "subnet": {"id": subnet_id},
                        "publicIPAddress": {"id": ip_id},
                    },
                }
            ],
        },
    }


def vm_tags(d: Deployment) -> dict[str, str]:
    """The deployment's tags plus fingerprints of what the container runs (see cloudinit.config_digest)."""
    tags = {
        **d.tags,
        TLS_TAG: d.cert or "off",
        CONFIG_TAG: cloudinit.config_digest(d.image, d.port, d.env, caddyfile=d.caddyfile, model=d.model),
    }
    secrets = cloudinit.secrets_digest(d.name, d.env)
    if secrets:
        tags[SECRETS_TAG] = secrets
    return tags


def vm_body(d: Deployment, nic_id: str, ssh_key: str, custom_data_b64: str) -> dict:
    """Ubuntu 24.04 Gen2, SSH key only (no password login), boot diagnostics, disk/NIC deleted with it."""
    return {
        "location": d.region,
        "tags": vm_tags(d),
        "properties": {
            "hardwareProfile": {"vmSize": d.size},
            "storageProfile": {
                "imageReference": dict(UBUNTU_2404),
                "osDisk": {
                    "name": d.os_disk,
                    "createOption": "FromImage",
                    "diskSizeGB": d.disk_gb,
                    "caching": "ReadWrite",
                    "deleteOption": "Delete",
                    "managedDisk": {"storageAccountType": "StandardSSD_LRS"},
                },
            },
            "osProfile": {
                "computerName": d.name,
                "adminUsername": ADMIN_USER,
                "customData": custom_data_b64,
                "linuxConfiguration": {
                    "disablePasswordAuthentication": True,
                    "provisionVMAgent": True,
                    "ssh": {
                        "publicKeys": [
                            {"path": f"/home/{ADMIN_USER}/.ssh/authorized_keys", "keyData": ssh_key}
                        ]
                    },
                },
            },
            "networkProfile": {
                "networkInterfaces": [
                    {"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}
                ]
            },
            "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
        },
    }


# -- deploy ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployResult:
    """Where the deployment answers and what this run did to the VM."""

    url: str
    fqdn: str
    ip: str
    vm_created: bool
    container_updated: bool


def _failing(d: Deployment, clients: AzureClients) -> Callable[[HttpResponseError], AzureActionError]:
    def wrap(exc: HttpResponseError) -> AzureActionError:
        return AzureActionError(
            explain(
                exc,
                region=d.region,
                size=d.size,
                name=d.name,
                available_sizes=lambda: available_sizes(clients, d.region),
            )
        )

    return wrap


def available_sizes(clients: AzureClients, region: str) -> list[str]:
    """VM sizes this subscription may use in `region`, from the resource SKU list (for suggestions)."""
    from infra.azure_errors import SUGGESTED_SIZES

    usable = set()
    for sku in clients.compute.resource_skus.list(filter=f"location eq '{region}'"):
        if sku.resource_type == "virtualMachines" and not any(
            r.type == "Location" for r in (sku.restrictions or [])
        ):
            usable.add(sku.name)
    preferred = [s for s in SUGGESTED_SIZES if s in usable]
    return preferred + sorted(usable - set(preferred))


def deploy(
    clients: AzureClients, d: Deployment, cloud_init_text: str, ssh_key: str, progress: Progress = _quiet
) -> DeployResult:
    """Create or converge every resource of `d`; safe to re-run (same names, PUT semantics).

    The VM is created once with the rendered cloud-init; custom_data is immutable afterwards, so a
    re-run with another image or settings updates the running container through run-command instead,
    and records what runs in a tag so an unchanged re-run does nothing to the VM.
    """
    fail = _failing(d, clients)
    net, compute = clients.network, clients.compute
    try:
        try:
            existing = compute.virtual_machines.get(d.group, d.vm)
        except ResourceNotFoundError:
            existing = None
        if existing is not None:
            _refuse_fixed_changes(d, dict(existing.tags or {}))
        progress(f"resource group {d.group}")
        clients.resources.resource_groups.create_or_update(d.group, {"location": d.region, "tags": d.tags})
        progress(f"network security group {d.nsg}")
        nsg = net.network_security_groups.begin_create_or_update(d.group, d.nsg, nsg_body(d)).result()
        progress(f"virtual network {d.vnet}")
        vnet = net.virtual_networks.begin_create_or_update(d.group, d.vnet, vnet_body(d)).result()
        progress(f"public IP {d.public_ip}")
        pip = net.public_ip_addresses.begin_create_or_update(d.group, d.public_ip, public_ip_body(d)).result()
        fqdn = pip.dns_settings.fqdn if pip.dns_settings and pip.dns_settings.fqdn else d.fqdn
        if d.tls and fqdn.lower() != d.fqdn.lower():
            raise AzureActionError(
                f"the public IP's DNS name is {fqdn}, not {d.fqdn} as the certificate "
                "would say; deploy with --no-tls on this cloud"
            )
        subnet_id = next(s.id for s in vnet.subnets if s.name == d.subnet)
        progress(f"network interface {d.nic}")
        nic = net.network_interfaces.begin_create_or_update(
            d.group, d.nic, nic_body(d, subnet_id, pip.id, nsg.id)
        ).result()
        if existing is None:
            progress(f"virtual machine {d.vm} ({d.size})")
            body = vm_body(d, nic.id, ssh_key, cloudinit.custom_data(cloud_init_text))
            compute.virtual_machines.begin_create_or_update(d.group, d.vm, body).result()
            updated = False
        else:
            updated = _converge_vm(clients, d, existing, progress)
    except HttpResponseError as exc:
        raise fail(exc) from exc
    return DeployResult(
        url=site_url(fqdn, d.port, d.tls),
        fqdn=fqdn,
        ip=pip.ip_address or "",
        vm_created=existing is None,
        container_updated=updated,
    )


def vm_exists(clients: AzureClients, names: Names) -> bool:
    """Whether the deployment's VM is there already (so first-boot data such as the token cannot change)."""
    try:
        clients.compute.virtual_machines.get(names.group, names.vm)
    except ResourceNotFoundError:
        return False
    return True


def _refuse_fixed_changes(d: Deployment, old_tags: dict[str, str]) -> None:
    """Refuse, before anything is touched, what an existing VM cannot change.

    Secret settings only travel in custom_data, which is fixed; nor can HTTPS be added or removed (Caddy
    is installed at first boot). The certificate's source can change, since that is only Caddy's config.
    """
    was_tls = old_tags.get(TLS_TAG, "off") != "off"
    if was_tls != d.tls:
        then, now = ("HTTPS", "--no-tls") if was_tls else ("plain HTTP", "HTTPS")
        raise AzureActionError(
            f"{d.vm} was created with {then}; it cannot switch to {now} in place. Re-run "
            f"{'with' if not was_tls else 'without'} --no-tls, or `invoke destroy-azure --name {d.name}` and "
            "deploy again."
        )
    secrets = cloudinit.secrets_digest(d.name, d.env)
    if secrets and secrets != old_tags.get(SECRETS_TAG):
        raise AzureActionError(
            f"{', '.join(sorted(cloudinit.SECRET_SETTINGS))} can only be set when the VM is created (it "
            f"travels only in custom_data). Keep the old value, or `invoke destroy-azure --name {d.name}` "
            "and deploy again."
        )


def _converge_vm(clients: AzureClients, d: Deployment, existing, progress: Progress) -> bool:
    """Bring an existing VM to `d`: size and tags by PUT (as `az vm update` does), container by run-command.

    What cannot change in place was refused already (_refuse_fixed_changes).
    """
    compute = clients.compute
    current = existing.as_dict(exclude_readonly=True)
    props = current.setdefault("properties", {})
    old_tags = dict(existing.tags or {})
    tags = vm_tags(d)
    if SECRETS_TAG not in tags and SECRETS_TAG in old_tags:
        tags[SECRETS_TAG] = old_tags[SECRETS_TAG]
    changed_size = str(props.get("hardwareProfile", {}).get("vmSize", "")).lower() != d.size.lower()
    new_config = old_tags.get(CONFIG_TAG) != tags[CONFIG_TAG]
    if changed_size:
        progress(f"resizing {d.vm} to {d.size} (the VM restarts)")
    power = power_state(clients, d)
    if power in ("deallocated", "stopped"):
        progress(f"starting {d.vm} (it was {power})")
        compute.virtual_machines.begin_start(d.group, d.vm).result()
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
        body = {
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
        compute.virtual_machines.begin_create_or_update(d.group, d.vm, body).result()
    else:
        progress(f"virtual machine {d.vm} (unchanged)")
    return new_config


# -- health ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """What the VM's port says: a phase (see PHASES) and any detail it gave."""

    phase: str
    detail: str = ""

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

    Before the container runs, cloud-init's status page answers there with the provisioning phase; then
    the service answers 503 loading / 200 ok / 503 error. No answer at all means the VM is still booting
    (with HTTPS: or Caddy has no certificate yet). With `tls`, `server_name` is the name the certificate
    is checked against, and `verify` is True (the system's CAs, or REQUESTS_CA_BUNDLE), a CA file, or
    False (encrypted but unchecked: only for the phase, nothing secret is sent).
    """
    try:
        if tls:
            status_code, data = _get_health_https(host, port, server_name or host, verify, timeout)
        else:
            netloc = host if port == 80 else f"{host}:{port}"
            response = requests.get(f"http://{netloc}/api/health", timeout=timeout)
            status_code, data = response.status_code, response.content
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        return Health("booting")
    try:
        body = json.loads(data)
    except ValueError:
        return Health("booting", f"HTTP {status_code}")
    status = body.get("status", "") if isinstance(body, dict) else ""
    if status in PHASES:
        return Health(status, str(body.get("detail") or body.get("model") or ""))
    return Health("booting", f"HTTP {status_code}")


def wait_healthy(
    host: str,
    port: int,
    *,
    timeout: float,
    interval: float = 5.0,
    on_phase: Callable[[Health], None] = lambda h: None,
    probe_timeout: float = 5.0,
    tls: bool = False,
    server_name: str = "",
    verify: bool | str = True,
) -> Health:
    """Poll the health endpoint until ok or error, or until `timeout` seconds; report each new phase.

    Checks come quickly at first, then every `interval` seconds. Polls the VM's IP rather than its DNS
    name: a brand-new DNS label can take a while to resolve everywhere, and a resolver that cached
    "no such name" would stall the wait for no reason (with HTTPS the name still goes in SNI and Host).
    """
    seen: list[Health] = []

    def look() -> Health:
        health = probe(host, port, timeout=probe_timeout, tls=tls, server_name=server_name, verify=verify)
        if not seen or seen[-1] != health:
            seen.append(health)
            on_phase(health)
        return health

    retrying = Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.1, max=interval),
        retry=retry_if_result(lambda h: h.phase not in FINAL_PHASES),
        retry_error_callback=lambda state: state.outcome.result(),
    )
    return retrying(look)


# -- run-command, diagnostics, logs, status, destroy ------------------------------------------------


def run_command(clients: AzureClients, names: Names, script: str) -> tuple[str, str]:
    """Run a shell script as root on the VM through the VM agent; returns (stdout, stderr).

    Azure keeps only the last 4 KiB of each stream, so callers ask for tails, not whole logs.
    """
    result = clients.compute.virtual_machines.begin_run_command(
        names.group, names.vm, {"commandId": "RunShellScript", "script": script.splitlines()}
    ).result()
    message = "\n".join(v.message or "" for v in (result.value or []))
    stdout, _, stderr = message.partition("[stderr]")
    stdout = stdout.split("[stdout]", 1)[-1]
    return stdout.strip("\n"), stderr.strip("\n")


DIAGNOSE_SCRIPT = """\
echo '--- cloud-init status'
cloud-init status --long 2>&1 || true
echo '--- qwen-box progress (cloud-init output, tail)'
tail -n 30 /var/log/cloud-init-output.log 2>&1 || true
echo '--- containers'
docker ps --all 2>&1 || true
echo '--- container log (tail)'
docker logs --tail 30 qwen-box 2>&1 || true
"""


def power_state(clients: AzureClients, names: Names) -> str:
    """running / deallocated / stopped / starting ... from the VM's instance view."""
    view = clients.compute.virtual_machines.instance_view(names.group, names.vm)
    for status in view.statuses or []:
        if status.code and status.code.startswith("PowerState/"):
            return status.code.split("/", 1)[1]
    return "unknown"


def diagnostics(clients: AzureClients, names: Names, serial_lines: int = 40) -> list[tuple[str, str]]:
    """What to show when the service did not come up: VM state, cloud-init and container state (via
    run-command), and the tail of the serial console (boot diagnostics). Each part is best effort."""
    sections: list[tuple[str, str]] = []
    try:
        sections.append(("VM power state", power_state(clients, names)))
    except HttpResponseError as exc:
        sections.append(("VM power state", f"unavailable: {explain(exc)}"))
    try:
        out, err = run_command(clients, names, DIAGNOSE_SCRIPT)
        text = (out + ("\n" + err if err else "")).strip()
        sections.append(("On the VM (run-command)", text or "(no output)"))
    except HttpResponseError as exc:
        sections.append(("On the VM (run-command)", f"unavailable: {explain(exc)}"))
    try:
        data = clients.compute.virtual_machines.retrieve_boot_diagnostics_data(names.group, names.vm)
        response = requests.get(data.serial_console_log_blob_uri, timeout=30, verify=clients.verify)
        response.raise_for_status()
        tail = "\n".join(response.text.splitlines()[-serial_lines:])
        sections.append(("Serial console (boot diagnostics, tail)", tail or "(empty)"))
    except (HttpResponseError, requests.RequestException) as exc:
        sections.append(("Serial console (boot diagnostics, tail)", f"unavailable: {exc.__class__.__name__}"))
    return sections


CADDY_ROOT_CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
PEM_BEGIN, PEM_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"


def fetch_ca_root(clients: AzureClients, names: Names) -> str:
    """The root certificate of Caddy's own authority on the VM (a private deployment's), via run-command.

    Public by nature (it is what a client checks the server against), so fetching it is harmless; the
    key stays on the VM.
    """
    try:
        out, err = run_command(clients, names, f"cat {CADDY_ROOT_CA}")
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc
    start, end = out.find(PEM_BEGIN), out.find(PEM_END)
    if start < 0 or end < start:
        raise AzureActionError(
            f"no root certificate at {CADDY_ROOT_CA} on {names.vm}: "
            f"{(err or out).strip()[-300:] or '(no output)'}"
        )
    return out[start : end + len(PEM_END)] + "\n"


def container_logs(clients: AzureClients, names: Names, lines: int = 100) -> str:
    """The container's log tail, fetched through run-command (no SSH needed)."""
    try:
        power = power_state(clients, names)
        if power != "running":
            raise AzureActionError(
                f"{names.vm} is {power}, so it cannot run commands: start it (re-run "
                "deploy-azure, which starts a stopped VM) and try again"
            )
        script = f"docker logs --tail {int(lines)} --timestamps {CONTAINER} 2>&1"
        out, err = run_command(clients, names, script)
    except ResourceNotFoundError as exc:
        raise AzureActionError(f"no deployment {names.name!r} (VM {names.vm} not found)") from exc
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc
    return (out + ("\n" + err if err else "")).strip()


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
    cert: str = ""  # infra/caddy.py's certificate mode; "" for plain HTTP
    exposure: list[str] = field(default_factory=list)
    health: Health | None = None

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    @property
    def url(self) -> str:
        return site_url(self.fqdn, self.port, self.tls) if self.fqdn else ""


def list_deployments(clients: AzureClients) -> list[tuple[str, str]]:
    """(name, region) of every qwen-box deployment in the subscription, found by tag."""
    groups = clients.resources.resource_groups.list(filter=f"tagName eq 'app' and tagValue eq '{APP_TAG}'")
    return sorted((g.tags["deployment"], g.location) for g in groups if (g.tags or {}).get("deployment"))


def status(
    clients: AzureClients, names: Names, probe_health: bool = True, ca_file: str = ""
) -> Status | None:
    """Power state, address, exposure and health of a deployment; None if it does not exist.

    `ca_file` is the root of the VM's own certificate authority (for a private deployment), when saved.
    """
    try:
        group = clients.resources.resource_groups.get(names.group)
    except ResourceNotFoundError:
        return None
    st = Status(name=names.name, region=group.location)
    try:
        vm = clients.compute.virtual_machines.get(names.group, names.vm)
        size = vm.hardware_profile.vm_size
        st.size = str(getattr(size, "value", size))
        st.power = power_state(clients, names)
        cert = (vm.tags or {}).get(TLS_TAG, "off")
        st.cert = "" if cert == "off" else cert
        pip = clients.network.public_ip_addresses.get(names.group, names.public_ip)
        st.fqdn = pip.dns_settings.fqdn if pip.dns_settings else ""
        st.ip = pip.ip_address or ""
        nsg = clients.network.network_security_groups.get(names.group, names.nsg)
        for rule in nsg.security_rules or []:
            sources = rule.source_address_prefixes or [rule.source_address_prefix]
            port = rule.destination_port_range
            if rule.name in (HTTP_RULE, HTTPS_RULE) and port and port.isdigit():
                st.port = int(port)
            shown = "everyone (Internet)" if INTERNET in sources or "*" in sources else ", ".join(sources)
            st.exposure.append(f"TCP {port} from {shown}")
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

    Returns False if there was nothing to delete. The VM is force-deleted (no graceful shutdown), which
    is what a teardown wants and is quicker.
    """
    groups = clients.resources.resource_groups
    try:
        if not groups.check_existence(names.group):
            return False
        progress(f"deleting resource group {names.group} and everything in it")
        groups.begin_delete(names.group, force_deletion_types="Microsoft.Compute/virtualMachines").result()
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc
    return True
