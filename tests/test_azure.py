"""Azure deployment against a fake Azure Resource Manager on loopback, through the real SDK clients.

What was created is read back from the fake's state (NSG rules and sources, VM size and image, SSH-only
login, tags, custom_data), not from what a mock was told. The health wait talks to a real local HTTP
server standing in for the VM (the fake public IP is 127.0.0.1). Nothing here leaves this machine: the
public-IP lookup and DefaultAzureCredential are replaced by functions that fail the test if called.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme
import yaml
from azure.core.exceptions import HttpResponseError
from azure.identity import ClientSecretCredential

from infra.azure import arm, credentials, provision, remote, state
from infra.azure import cli as azure_cli
from infra.azure.credentials import AzureClients, Cloud, CredentialsError
from infra.azure.deployment import (
    TOKEN_ENV,
    UBUNTU_2404,
    Deployment,
    DeployOptions,
    PlanError,
    parse_sources,
    prepare,
)
from infra.azure.errors import AzureActionError
from infra.azure.plan import make_plan
from infra.azure.target import SingleVm
from infra.health import Health, probe, wait_healthy
from infra.vm import cloudinit
from infra.vm.caddy import http_caddyfile
from tests.support.azure import FAST, FakeCredential, connect_to, invoke
from tests.support.fake_arm import FakeArm, succeeding_vm
from tests.support.health import HealthServer
from tests.support.live import free_port

pytestmark = pytest.mark.usefixtures("azure_offline")
IMAGE = "myreg.azurecr.io/qwen-box:1.0"
ME = "203.0.113.7/32"
VM = "Microsoft.Compute/virtualMachines"
NSG = "Microsoft.Network/networkSecurityGroups"


def deployment(**kw) -> Deployment:
    values = dict(name="qb-test", image=IMAGE, allow_from=(ME,), env={"DTYPE": "float32"})
    values.update(kw)
    return Deployment(**values)


def run_deploy(clients: AzureClients, d: Deployment) -> provision.DeployResult:
    text = cloudinit.render(d.image, d.port, d.env, caddyfile=d.caddyfile, model=d.model)
    return provision.deploy(clients, d, text, "ssh-ed25519 AAAAC3Nz test")


# The certificate authority of the stand-in VMs' HTTPS: Caddy's own on a private VM, or "Let's Encrypt"
# for a public one (the test then trusts it through REQUESTS_CA_BUNDLE, as a user behind a corporate CA).
VM_CA = trustme.CA()
VM_CERT = VM_CA.issue_cert("*.eastus.cloudapp.azure.com")


class StandInVM(HealthServer):
    """A real HTTP(S) server where the VM's port would be: answers /api/health from a script of replies.

    With `tls` it speaks HTTPS with a certificate for *.eastus.cloudapp.azure.com from VM_CA, as Caddy on
    the VM would for its DNS name.
    """

    def __init__(self, replies: list[tuple[int, dict]], tls: bool = False):
        context = None
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            VM_CERT.configure_cert(context)
        super().__init__(replies, tls=context)


LOADING = (503, {"status": "loading", "model": "Qwen/Qwen2.5-1.5B-Instruct"})
OK = (200, {"status": "ok", "model": "Qwen/Qwen2.5-1.5B-Instruct"})
PULLING = (200, {"status": "pulling", "detail": "pulling " + IMAGE})


# -- what a deployment creates ----------------------------------------------------------------------


def test_deploy_creates_every_resource_tagged_in_one_group(fake, clients):
    d = deployment()
    result = run_deploy(clients, d)
    assert result.vm_created and result.ip == "127.0.0.1"
    assert result.url == "https://qb-test.eastus.cloudapp.azure.com/"
    prefix = f"/subscriptions/{fake.subscription}/resourceGroups/qb-test-rg/providers/"
    assert fake.resource_ids() == sorted(
        prefix + p
        for p in [
            "Microsoft.Compute/disks/qb-test-osdisk",
            f"{VM}/qb-test-vm",
            "Microsoft.Network/networkInterfaces/qb-test-nic",
            f"{NSG}/qb-test-nsg",
            "Microsoft.Network/publicIPAddresses/qb-test-ip",
            "Microsoft.Network/virtualNetworks/qb-test-vnet",
        ]
    )
    assert fake.groups["qb-test-rg"]["tags"] == {"app": "qwen-box", "deployment": "qb-test"}
    for rid in fake.resource_ids():
        resource = next(r for r in fake.resources.values() if r["id"] == rid)
        assert {"app": "qwen-box", "deployment": "qb-test"}.items() <= resource.get("tags", {}).items(), rid
        assert resource["location"] == "eastus"
    pip = fake.resource("qb-test-rg", "Microsoft.Network/publicIPAddresses", "qb-test-ip")
    assert pip["sku"]["name"] == "Standard" and pip["properties"]["publicIPAllocationMethod"] == "Static"
    assert pip["properties"]["dnsSettings"]["domainNameLabel"] == "qb-test"


def test_the_os_disk_gets_the_tags_azure_does_not_copy_to_it(fake, clients):
    """The fake, like Azure, creates the VM's disk untagged; deploy tags it, and a re-deploy tags the disk
    of a VM made before that (its tags were lost), without touching the VM."""
    run_deploy(clients, deployment())
    disk = fake.resource("qb-test-rg", "Microsoft.Compute/disks", "qb-test-osdisk")
    assert disk["tags"] == {"app": "qwen-box", "deployment": "qb-test"}
    disk["tags"] = {"owner": "kept"}
    run_deploy(clients, deployment())
    assert disk["tags"] == {"owner": "kept", "app": "qwen-box", "deployment": "qb-test"}
    assert fake.count("PATCH", "/disks/qb-test-osdisk$") == 2
    assert fake.count("PUT", "virtualMachines/qb-test-vm$") == 1


def inbound(fake: FakeArm, name: str = "qb-test") -> dict[str, tuple[str, tuple[str, ...]]]:
    """The NSG's rules as read back from the fake: rule name -> (port, sources)."""
    out = {}
    for rule in fake.resource(f"{name}-rg", NSG, f"{name}-nsg")["properties"]["securityRules"]:
        p = rule["properties"]
        assert (p["direction"], p["access"], p["protocol"]) == ("Inbound", "Allow", "Tcp")
        sources = tuple(p.get("sourceAddressPrefixes") or [p["sourceAddressPrefix"]])
        out[rule["name"]] = (p["destinationPortRange"], sources)
    return out


def test_exposure_is_private_by_default_and_ssh_closed(fake, clients):
    run_deploy(clients, deployment())
    assert inbound(fake) == {"allow-chat-https": ("443", (ME,)), "allow-http-redirect": ("80", (ME,))}
    nic = fake.resource("qb-test-rg", "Microsoft.Network/networkInterfaces", "qb-test-nic")
    assert nic["properties"]["networkSecurityGroup"]["id"].endswith("/qb-test-nsg")
    assert fake.resource("qb-test-rg", VM, "qb-test-vm")["tags"][arm.TLS_TAG] == "internal"


@pytest.mark.parametrize(
    "options, expected, cert",
    [
        (
            {"public": True},
            {"allow-chat-https": ("443", ("Internet",)), "allow-http-redirect": ("80", ("Internet",))},
            "acme",
        ),
        (
            {"trusted_cert": True},
            {"allow-chat-https": ("443", (ME,)), "allow-http-redirect": ("80", ("Internet",))},
            "acme-http",
        ),
        (
            {"allow_from": (ME, "198.51.100.0/24"), "port": 8443},
            {
                "allow-chat-https": ("8443", (ME, "198.51.100.0/24")),
                "allow-http-redirect": ("80", (ME, "198.51.100.0/24")),
            },
            "internal",
        ),
        ({"tls": False}, {"allow-chat-http": ("80", (ME,))}, "off"),
        ({"tls": False, "port": 8080, "public": True}, {"allow-chat-http": ("8080", ("Internet",))}, "off"),
    ],
)
def test_https_and_redirect_ports_open_to_the_same_sources(fake, clients, options, expected, cert):
    """443 and 80 from the allowed sources; 80 from the Internet only where a public CA must check it."""
    run_deploy(clients, deployment(**options))
    assert inbound(fake) == expected
    assert fake.resource("qb-test-rg", VM, "qb-test-vm")["tags"][arm.TLS_TAG] == cert


def test_https_custom_data_carries_caddy_and_binds_the_app_to_loopback(fake, clients):
    d = deployment(model="Qwen/Qwen2.5-0.5B-Instruct")
    run_deploy(clients, d)
    text = base64.b64decode(fake.custom_data("qb-test-rg", "qb-test-vm")).decode()
    assert text == cloudinit.render(IMAGE, 443, d.env, caddyfile=d.caddyfile, model=d.model)
    files = {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}
    assert files["/etc/qwen-box/Caddyfile"] == d.caddyfile
    assert "qb-test.eastus.cloudapp.azure.com {" in d.caddyfile and "tls internal" in d.caddyfile
    assert files["/etc/qwen-box/port"] == "127.0.0.1:8000\n"
    assert files["/etc/qwen-box/model"] == "Qwen/Qwen2.5-0.5B-Instruct\n"
    assert "PROXY_HOPS" not in files["/etc/qwen-box/service.env"]  # the CLI adds it (tested below)


def test_vm_is_ubuntu_2404_with_ssh_key_login_only(fake, clients):
    run_deploy(clients, deployment(size="Standard_B2ms", disk_gb=80))
    props = fake.resource("qb-test-rg", VM, "qb-test-vm")["properties"]
    assert props["hardwareProfile"]["vmSize"] == "Standard_B2ms"
    assert props["storageProfile"]["imageReference"] == UBUNTU_2404
    assert props["storageProfile"]["imageReference"]["sku"] == "server"  # the Gen2 image
    disk = props["storageProfile"]["osDisk"]
    assert disk["diskSizeGB"] == 80 and disk["deleteOption"] == "Delete"
    linux = props["osProfile"]["linuxConfiguration"]
    assert linux["disablePasswordAuthentication"] is True
    assert linux["ssh"]["publicKeys"] == [
        {"path": "/home/azureuser/.ssh/authorized_keys", "keyData": "ssh-ed25519 AAAAC3Nz test"}
    ]
    assert "adminPassword" not in props["osProfile"]
    assert props["diagnosticsProfile"]["bootDiagnostics"]["enabled"] is True


def test_custom_data_is_the_rendered_cloud_init_with_image_and_settings(fake, clients):
    d = deployment(env={"DTYPE": "float32", "QUEUE_SIZE": "4"}, port=8080, tls=False)
    run_deploy(clients, d)
    text = base64.b64decode(fake.custom_data("qb-test-rg", "qb-test-vm")).decode()
    assert text == cloudinit.render(IMAGE, 8080, {"DTYPE": "float32", "QUEUE_SIZE": "4"})
    assert text.startswith("#cloud-config") and f"      {IMAGE}\n" in text
    assert "DTYPE=float32" in text and "QUEUE_SIZE=4" in text and "      127.0.0.1:8000\n" in text
    assert (
        "http://:8080 {" in text
    )  # --no-tls: Caddy serves plain HTTP on the port, the app stays on loopback
    assert "customData" not in json.dumps(fake.resource("qb-test-rg", VM, "qb-test-vm"))


def test_the_sdk_speaks_to_the_configured_endpoint_with_its_scope(fake):
    credential = FakeCredential()
    run_deploy(connect_to(fake, credential), deployment())
    assert set(credential.scopes) == {f"{fake.url}/.default"}
    assert all(version for method, path, version in fake.requests if not path.startswith("/fake/"))


# -- converging, updating, destroying ------------------------------------------------------------------


def test_deploying_twice_converges_to_the_same_resources(fake, clients):
    d = deployment()
    run_deploy(clients, d)
    before = fake.resource_ids()
    vm_id = fake.resource("qb-test-rg", VM, "qb-test-vm")["properties"]["vmId"]
    again = run_deploy(clients, d)
    assert not again.vm_created and not again.container_updated
    assert fake.resource_ids() == before
    assert fake.resource("qb-test-rg", VM, "qb-test-vm")["properties"]["vmId"] == vm_id
    assert fake.count("PUT", "virtualMachines/qb-test-vm$") == 1
    assert fake.run_commands == []


def test_redeploy_with_a_new_image_updates_the_container_not_the_vm(fake, clients):
    run_deploy(clients, deployment())
    first_data = fake.custom_data("qb-test-rg", "qb-test-vm")
    result = run_deploy(clients, deployment(image="myreg.azurecr.io/qwen-box:2.0"))
    assert result.container_updated and not result.vm_created
    assert fake.custom_data("qb-test-rg", "qb-test-vm") == first_data
    (script,) = fake.run_commands
    assert base64.b64encode(b"myreg.azurecr.io/qwen-box:2.0").decode() in script
    d = deployment()
    expected = cloudinit.update_script(
        "myreg.azurecr.io/qwen-box:2.0", 443, {"DTYPE": "float32"}, caddyfile=d.caddyfile
    )
    assert script + "\n" == expected
    tags = fake.resource("qb-test-rg", VM, "qb-test-vm")["tags"]
    digest = cloudinit.config_digest(
        "myreg.azurecr.io/qwen-box:2.0", 443, {"DTYPE": "float32"}, caddyfile=d.caddyfile
    )
    assert tags[arm.CONFIG_TAG] == digest
    assert len(fake.resource_ids()) == 6


def test_redeploy_changes_exposure_in_place(fake, clients):
    run_deploy(clients, deployment())
    run_deploy(
        clients,
        deployment(public=True, ssh=True, allow_from=("198.51.100.0/24",), ssh_from=("198.51.100.0/24",)),
    )
    rules = {
        r["name"]: r["properties"]
        for r in fake.resource("qb-test-rg", NSG, "qb-test-nsg")["properties"]["securityRules"]
    }
    assert rules["allow-chat-https"]["sourceAddressPrefix"] == "Internet"
    assert rules["allow-http-redirect"]["sourceAddressPrefix"] == "Internet"
    assert rules["allow-ssh"]["sourceAddressPrefix"] == "198.51.100.0/24"
    assert rules["allow-ssh"]["destinationPortRange"] == "22"
    (script,) = fake.run_commands  # the certificate's source changed: Caddy gets the new config
    assert base64.b64encode(deployment(public=True).caddyfile.encode()).decode() in script


def test_https_cannot_be_switched_on_or_off_in_place(fake, clients):
    run_deploy(clients, deployment(tls=False))
    with pytest.raises(AzureActionError, match="created with plain HTTP.*destroy-azure"):
        run_deploy(clients, deployment())
    assert fake.run_commands == []
    assert inbound(fake) == {"allow-chat-http": ("80", (ME,))}  # refused before anything changed


def test_stopped_vm_is_started_on_redeploy(fake, clients):
    run_deploy(clients, deployment())
    fake.power_state = "deallocated"
    run_deploy(clients, deployment())
    assert fake.power_state == "running" and fake.count("POST", "/start$") == 1


def test_destroy_leaves_nothing(fake, clients):
    d = deployment()
    run_deploy(clients, d)
    assert provision.destroy(clients, d) is True
    assert fake.is_empty()
    assert provision.destroy(clients, d) is False
    assert provision.status(clients, d) is None


@pytest.mark.reliability
@pytest.mark.parametrize(
    "tags", [{}, {"team": "payments"}, {"app": "qwen-box", "deployment": "someone-else"}], ids=str
)
def test_a_group_that_is_not_ours_is_never_touched(cli, capsys, tags):
    """Another team's group of the same name (or another deployment's): destroy, status, logs and
    re-deploy refuse it, name the tags found, and send no write at all."""
    clients = connect_to(cli)
    clients.resources.resource_groups.create_or_update("qb-test-rg", {"location": "eastus", "tags": tags})
    clients.network.network_security_groups.begin_create_or_update(
        "qb-test-rg", "their-nsg", {"location": "eastus", "properties": {"securityRules": []}}
    ).result()
    writes_before = sum(cli.count(m, ".") for m in ("PUT", "PATCH", "POST", "DELETE"))
    shown = ", ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "no tags at all"
    for argv in (
        ("destroy-azure", "--name", "qb-test", "--yes"),
        ("status-azure", "--name", "qb-test"),
        ("logs-azure", "--name", "qb-test"),
        ("deploy-azure", "--image", IMAGE, "--name", "qb-test", "--allow-from", ME, "--timeout", "1"),
    ):
        assert invoke(*argv) == 1, argv
        out = capsys.readouterr().out
        assert f"it carries {shown}" in out and "Nothing was changed" in out, (argv, out)
    with pytest.raises(AzureActionError, match="is not qwen-box deployment qb-test"):
        run_deploy(clients, deployment())
    with pytest.raises(AzureActionError, match="is not qwen-box deployment qb-test"):
        provision.destroy(clients, deployment())
    assert sum(cli.count(m, ".") for m in ("PUT", "PATCH", "POST", "DELETE")) == writes_before
    assert cli.groups["qb-test-rg"]["tags"] == tags
    assert cli.resource("qb-test-rg", NSG, "their-nsg")


# -- Azure's failures -------------------------------------------------------------------------------


def test_429_waits_as_retry_after_says_then_succeeds(fake, clients):
    fake.fail(
        "PUT",
        "networkSecurityGroups",
        429,
        "TooManyRequests",
        "Too many requests",
        headers={"Retry-After": "1"},
    )
    started = time.monotonic()
    run_deploy(clients, deployment())
    assert time.monotonic() - started >= 1.0
    assert fake.count("PUT", "networkSecurityGroups") == 2
    assert fake.resource("qb-test-rg", NSG, "qb-test-nsg")


def test_transient_5xx_is_retried(fake, clients):
    fake.fail("PUT", "virtualMachines/qb-test-vm$", 503, "ServiceUnavailable", "try later", times=2)
    fake.fail("GET", "virtualNetworks", 500, "InternalServerError", "oops")
    assert run_deploy(clients, deployment()).vm_created
    assert fake.count("PUT", "virtualMachines/qb-test-vm$") == 3


def test_5xx_that_persists_is_explained(fake, clients):
    fake.fail("PUT", "publicIPAddresses", 500, "InternalServerError", "boom", times=10)
    with pytest.raises(AzureActionError, match="(?s)internal error .*persisted through retries"):
        run_deploy(clients, deployment())


@pytest.mark.reliability
@pytest.mark.parametrize("status, code", [(429, "TooManyRequests"), (503, "ServiceUnavailable")])
def test_a_storm_of_throttling_or_5xx_gets_all_the_configured_retries(fake, status, code):
    """azure-core stops answer retries at 3 unless retry_status is set: the 4th and 5th 429/503 must be
    retried too, since RetrySettings.total (6) is what we configured."""
    clients = connect_to(fake, retry=dataclasses.replace(FAST, total=6))
    fake.fail(
        "PUT", "networkSecurityGroups", status, code, "slow down", times=5, headers={"Retry-After": "0"}
    )
    fake.fail("GET", "virtualMachines/qb-test-vm$", status, code, "slow down", times=5)
    assert run_deploy(clients, deployment()).vm_created
    assert fake.count("PUT", "networkSecurityGroups") == 6
    assert fake.count("GET", "virtualMachines/qb-test-vm$") >= 6


def test_quota_exceeded_is_explained(fake, clients):
    fake.fail(
        "PUT",
        "virtualMachines",
        409,
        "OperationNotAllowed",
        "Operation could not be completed as it results in exceeding approved standardBSFamily Cores quota.",
    )
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment())
    assert "quota exceeded in eastus" in str(err.value) and "Usage + quotas" in str(err.value)


def test_quota_failure_reported_by_the_long_running_operation(fake, clients):
    fake.fail("PUT", "virtualMachines", 200, "QuotaExceeded", "Quota exceeded for regional vCPUs.", lro=True)
    with pytest.raises(AzureActionError, match="quota exceeded"):
        run_deploy(clients, deployment())


def test_allocation_failure_is_explained(fake, clients):
    fake.fail("PUT", "virtualMachines", 200, "AllocationFailed", "Allocation failed.", lro=True)
    with pytest.raises(AzureActionError, match="no capacity for Standard_B2s in eastus"):
        run_deploy(clients, deployment())


def writes(fake: FakeArm) -> list[tuple[str, str, str]]:
    """Every request that could create, change or delete something (a GET or a SKU list cannot)."""
    return [r for r in fake.requests if r[0] in ("PUT", "PATCH", "DELETE", "POST") and "/fake/" not in r[1]]


def test_unavailable_size_suggests_one_that_is_available(fake, clients):
    fake.restrict_sku("Standard_B2s", "eastus")
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment())
    message = str(err.value)
    assert "Standard_B2s is not available in eastus" in message
    assert "Standard_B2ms" in message and "--size" in message


# -- asked before anything billed is created: the size offered, the vCPU quota ----------------------------


@pytest.mark.parametrize("reason", ["NotAvailableForSubscription", "QuotaId"])
def test_a_restricted_size_is_refused_before_the_first_put(fake, clients, reason):
    """Azure would refuse it only at the VM's PUT, after the network, IP and NIC exist: asked first, the
    SKU list's restriction says why, and nothing at all is created."""
    fake.restrict_sku("Standard_B2s", "eastus", reason)
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment())
    message = str(err.value)
    assert (
        f"Standard_B2s is not available in eastus for this subscription: it is restricted ({reason}"
        in message
    )
    assert "Sizes that fit in eastus: Standard_B2ms, Standard_B2as_v2, Standard_D2as_v5" in message
    assert "Nothing was created" in message
    assert writes(fake) == [] and fake.is_empty()
    assert fake.count("GET", "/providers/Microsoft.Compute/skus$") >= 1


def test_a_size_the_region_does_not_offer_is_refused_before_the_first_put(fake, clients):
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment(size="Standard_NC24ads_A100_v4", env={"DTYPE": "int8"}))
    message = str(err.value)
    assert "Standard_NC24ads_A100_v4 is not offered in eastus" in message
    assert "Sizes that fit in eastus: Standard_B2s, Standard_B2ms" in message
    assert writes(fake) == [] and fake.is_empty()


def test_a_family_over_its_vcpu_quota_is_refused_naming_sizes_of_other_families(fake, clients):
    """9 of 10 B-series vCPUs in use: a B2s (2 vCPUs) would exceed it, and so would any B size; the
    sizes named are of families with room, the project's preferred first."""
    fake.quota["standardBSFamily"] = (9, 10)
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment())
    message = str(err.value)
    assert "over the Standard BS Family vCPUs quota in eastus: 9 of 10 used, 1 free" in message
    assert "Usage + quotas, Standard BS Family vCPUs" in message
    fits = re.search(r"Sizes that fit in eastus: (.*) \(--size\)", message)
    assert fits and fits.group(1).split(", ") == [
        "Standard_B2as_v2",
        "Standard_D2as_v5",
        "Standard_D2s_v5",
        "Standard_D4as_v5",
        "Standard_D4s_v5",
    ]
    assert writes(fake) == [] and fake.is_empty()
    assert fake.count("GET", "/locations/eastus/usages$") == 1


def test_the_regional_vcpu_total_is_checked_too(fake, clients):
    fake.regional_cores = (19, 20)
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment())
    message = str(err.value)
    assert "over the region's total vCPU quota in eastus: 19 of 20 used, 1 free" in message
    assert "No other size fits in eastus" in message and "--region" in message
    assert "Usage + quotas, Total Regional vCPUs" in message
    assert writes(fake) == [] and fake.is_empty()


def test_the_sizes_named_leave_out_those_too_small_for_the_model(fake, clients):
    """The model at float32 needs more than a B2s's 4 GiB: the sizes named are ones it fits."""
    fake.restrict_sku("Standard_B4ms", "eastus")
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment(size="Standard_B4ms", env={"DTYPE": "float32"}))
    fits = re.search(r"Sizes that fit in eastus: (.*) \(--size\)", str(err.value))
    assert fits and fits.group(1).split(", ")[:2] == ["Standard_B2ms", "Standard_B2as_v2"]


def test_an_unchanged_redeploy_at_full_quota_converges(fake, clients):
    """The deployment's own VM is counted in the usage already: with the family and the region full,
    re-deploying the same size needs nothing more and is not refused."""
    run_deploy(clients, deployment())
    fake.quota["standardBSFamily"] = (0, 2)
    fake.regional_cores = (0, 2)
    assert not run_deploy(clients, deployment()).vm_created
    assert fake.count("PUT", "virtualMachines/qb-test-vm$") == 1
    result = run_deploy(clients, deployment(image="myreg.azurecr.io/qwen-box:1.1"))
    assert not result.vm_created and result.container_updated


def test_a_size_change_counts_only_the_difference(fake, clients):
    run_deploy(clients, deployment())
    fake.quota["standardBSFamily"] = (0, 2)
    fake.regional_cores = (0, 2)
    run_deploy(clients, deployment(size="Standard_B2ms"))  # same family, same vCPUs: nothing more
    run_deploy(clients, deployment(size="Standard_D2s_v5"))  # another family; the region's total is even
    vm = fake.resource("qb-test-rg", VM, "qb-test-vm")
    assert vm["properties"]["hardwareProfile"]["vmSize"] == "Standard_D2s_v5"
    before = writes(fake)
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment(size="Standard_D4s_v5"))  # 2 vCPUs more than the region has free
    assert "needs 2 more vCPUs, over the region's total vCPU quota" in str(err.value)
    assert writes(fake) == before


def test_dns_name_taken_by_someone_else(fake, clients):
    fake.groups["someone-else"] = {
        "id": "x",
        "name": "someone-else",
        "location": "eastus",
        "tags": {},
        "properties": {"provisioningState": "Succeeded"},
    }
    clients.network.public_ip_addresses.begin_create_or_update(
        "someone-else", "their-ip", arm.public_ip_body(deployment())
    ).result()
    with pytest.raises(AzureActionError, match="(?s)already taken .*choose another --name"):
        run_deploy(clients, deployment())


def test_conflict_409_is_explained(fake, clients):
    fake.fail(
        "PUT",
        "networkInterfaces",
        409,
        "AnotherOperationInProgress",
        "Another operation on this or dependent resource is in progress.",
    )
    with pytest.raises(AzureActionError, match="(?s)conflict .*re-run"):
        run_deploy(clients, deployment())


def test_authorization_failure_is_explained(fake, clients):
    fake.fail(
        "PUT",
        "resourcegroups/qb-test-rg$",
        403,
        "AuthorizationFailed",
        "The client 'x' does not have authorization to perform action "
        "'Microsoft.Resources/subscriptions/resourcegroups/write'.",
    )
    with pytest.raises(AzureActionError, match="Contributor"):
        run_deploy(clients, deployment())


def test_sign_in_failure_says_az_login(fake):
    with pytest.raises(AzureActionError, match="az login"):
        run_deploy(connect_to(fake, FakeCredential(fail=True)), deployment())
    assert fake.requests == []


def test_a_wrong_client_secret_says_so_not_no_subscription(fake):
    """azure-identity's own ClientSecretCredential, signing in at the fake's Entra endpoint, is refused
    with AADSTS7000215: the message names the secret and how to make a new one."""
    credential = ClientSecretCredential(
        "00000000-0000-0000-0000-0000000000aa",
        "11111111-0000-0000-0000-000000000000",
        "not-the-secret",
        authority=fake.url,
        connection_verify=fake.ca_path,
        disable_instance_discovery=True,
    )
    with pytest.raises(AzureActionError) as err:
        run_deploy(connect_to(fake, credential), deployment())
    message = str(err.value)
    assert "AADSTS7000215" in message and "AZURE_CLIENT_SECRET" in message
    assert "az ad sp credential reset" in message and "no Azure subscription" not in message
    assert fake.count("POST", "/oauth2/v2.0/token$") >= 1
    assert not [r for r in fake.requests if r[1].startswith("/subscriptions/")]


def test_a_resize_the_hardware_cluster_cannot_take_says_deallocate(fake, clients):
    run_deploy(clients, deployment())
    fake.fail(
        "PUT",
        "virtualMachines/qb-test-vm$",
        409,
        "OperationNotAllowed",
        "Unable to resize the VM 'qb-test-vm' because the requested size Standard_D4s_v5 is not "
        "available in the current hardware cluster. The available sizes in this cluster are: "
        "Standard_B1s, Standard_B2s. Read more on VM resizing strategy at https://aka.ms/azure-resizevm.",
    )
    with pytest.raises(AzureActionError) as err:
        run_deploy(clients, deployment(size="Standard_D4s_v5"))
    message = str(err.value)
    assert "Standard_D4s_v5 is not offered by the hardware cluster" in message
    assert "az vm deallocate --resource-group qb-test-rg --name qb-test-vm" in message
    assert "Another operation" not in message


def test_a_failed_run_command_says_what_failed_and_what_to_do(fake, clients):
    run_deploy(clients, deployment())
    fake.fail(
        "POST",
        "runCommand$",
        200,
        "VMAgentStatusCommunicationError",
        "VM 'qb-test-vm' has not reported status for VM agent or extensions.",
        lro=True,
    )
    with pytest.raises(AzureActionError) as err:
        remote.container_logs(clients, deployment())
    message = str(err.value)
    assert "Run Command on qb-test-vm failed (VMAgentStatusCommunicationError)" in message
    assert "VM agent" in message and "az vm restart" in message
    assert "refused the request" not in message


# -- credentials and settings ------------------------------------------------------------------------


def test_subscription_from_flag_env_or_cli_profile(tmp_path):
    assert credentials.resolve_subscription("sub-flag", {"AZURE_SUBSCRIPTION_ID": "sub-env"}) == "sub-flag"
    assert credentials.resolve_subscription("", {"AZURE_SUBSCRIPTION_ID": "sub-env"}) == "sub-env"
    (tmp_path / "azureProfile.json").write_text(
        json.dumps(
            {"subscriptions": [{"id": "sub-other", "isDefault": False}, {"id": "sub-cli", "isDefault": True}]}
        ),
        encoding="utf-8-sig",
    )
    assert credentials.resolve_subscription("", {"AZURE_CONFIG_DIR": str(tmp_path)}) == "sub-cli"
    with pytest.raises(CredentialsError, match="az login.*AZURE_SUBSCRIPTION_ID"):
        credentials.resolve_subscription("", {"AZURE_CONFIG_DIR": str(tmp_path / "none")})


def test_cloud_endpoints_are_settings():
    gov = Cloud.from_env(
        {
            "AZURE_ARM_ENDPOINT": "https://management.usgovcloudapi.net/",
            "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.us",
        }
    )
    assert gov.arm_endpoint == "https://management.usgovcloudapi.net"
    assert gov.scope == "https://management.usgovcloudapi.net/.default"
    assert gov.authority_host == "https://login.microsoftonline.us"
    assert Cloud.from_env({}).arm_endpoint == "https://management.azure.com"


def test_ssh_key_is_the_users_own_or_generated_and_saved(tmp_path):
    key, path, generated = credentials.ssh_public_key(tmp_path / "ssh")
    assert generated and key.startswith("ssh-ed25519 ") and path.name == "qwen-box_ed25519.pub"
    assert (tmp_path / "ssh" / "qwen-box_ed25519").stat().st_mode & 0o777 == 0o600
    assert credentials.ssh_public_key(tmp_path / "ssh")[:2] == (key, path)
    (tmp_path / "ssh" / "id_ed25519.pub").write_text("ssh-ed25519 AAAAmine me@laptop\n")
    assert credentials.ssh_public_key(tmp_path / "ssh")[0] == "ssh-ed25519 AAAAmine me@laptop"


def test_plan_inputs_are_validated():
    assert parse_sources("203.0.113.7, 198.51.100.0/24") == ("203.0.113.7/32", "198.51.100.0/24")
    for bad in ("0.0.0.0/0", "not-an-ip", ""):
        with pytest.raises(PlanError):
            parse_sources(bad)
    for kw in ({"name": "Bad_Name"}, {"name": "x"}, {"region": "East US"}, {"port": 22}, {"disk_gb": 10}):
        with pytest.raises(PlanError):
            deployment(**kw)


def test_ipv6_sources_are_refused_before_anything_is_sent(cli, capsys, fake, clients):
    """The public IP is IPv4 only, and ARM refuses one rule mixing families (the fake does too)."""
    for sources in (f"{ME},2001:db8::1", "2001:db8::/64"):
        assert invoke("deploy-azure", "--image", IMAGE, "--name", "qb-v6", "--allow-from", sources) == 2
        out = capsys.readouterr().out
        assert "IPv6" in out and "IPv4 only" in out and "2001:db8::" in out
    assert cli.requests == []
    with pytest.raises(PlanError, match="IPv4 only"):
        deployment(allow_from=(ME, "2001:db8::1/128"))
    clients.resources.resource_groups.create_or_update("qb-test-rg", {"location": "eastus"})
    mixed = arm.nsg_body(deployment(allow_from=(ME, "198.51.100.0/24")))
    mixed["properties"]["securityRules"][0]["properties"]["sourceAddressPrefixes"][1] = "2001:db8::/64"
    with pytest.raises(HttpResponseError) as err:
        clients.network.network_security_groups.begin_create_or_update("qb-test-rg", "x", mixed).result()
    assert err.value.error.code == "ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies"


def test_plan_shows_resources_exposure_and_cost():
    plan = make_plan(deployment(allow_from=()))
    assert [kind for kind, _, _ in plan.resources][:2] == ["Resource group", "Network security group"]
    assert any("only from your public IP" in e for e in plan.exposure)
    assert any("SSH): closed" in e for e in plan.exposure)
    assert 35 < plan.monthly_total < 45
    public = make_plan(deployment(public=True, size="Standard_Z9"))
    assert any("WHOLE INTERNET" in e for e in public.exposure) and public.monthly_total is None


# -- health wait --------------------------------------------------------------------------------------


def test_health_wait_follows_the_phases_to_ok():
    vm = StandInVM([PULLING, LOADING, LOADING, OK])
    try:
        seen = []
        health = wait_healthy("127.0.0.1", vm.port, timeout=10, interval=0.02, on_phase=seen.append)
    finally:
        vm.stop()
    assert health.phase == "ok"
    assert [h.phase for h in seen] == ["pulling", "loading", "ok"]


def test_health_wait_sees_a_booting_vm_then_stops_at_the_timeout():
    port = free_port()
    started = time.monotonic()
    health = wait_healthy("127.0.0.1", port, timeout=0.5, interval=0.05, probe_timeout=0.2)
    assert health == Health("unreachable", "connection refused") and time.monotonic() - started < 3


def test_health_wait_stops_early_on_an_error():
    vm = StandInVM([(200, {"status": "error", "detail": "provisioning failed at line 42"})])
    try:
        health = wait_healthy("127.0.0.1", vm.port, timeout=30, interval=0.02)
    finally:
        vm.stop()
    assert health.phase == "error" and "line 42" in health.detail and vm.hits == 1


@contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port whose connections time out, as an NSG that drops them: a listener with a full
    backlog that never accepts (Linux then drops further SYNs). No packet leaves loopback."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    try:
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


class NotTheService(HealthServer):
    """A server answering HTML with 502, as Caddy does while the container behind it is not up."""

    def __init__(self):
        super().__init__([(502, {})])

        def bad_gateway(handler) -> None:
            handler.send_response(502)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", "4")
            handler.end_headers()
            handler.wfile.write(b"<p/>")

        self.server.RequestHandlerClass.do_GET = bad_gateway


def test_the_probe_tells_apart_why_nothing_answers():
    """Timed out (an NSG dropping), refused (up, nothing listening), no TLS session (Caddy without a
    certificate), an answer that is not the service's, and the service's own 503 loading."""
    with silent_port() as port:
        timed_out = probe("127.0.0.1", port, timeout=0.3)
        timed_out_tls = probe("127.0.0.1", port, timeout=0.3, tls=True, server_name="x", verify=False)
    assert timed_out == Health("unreachable", "connection timed out") == timed_out_tls
    assert timed_out.blocked and timed_out.label == "no answer: connection timed out"
    refused = probe("127.0.0.1", free_port(), timeout=0.3)
    assert refused == Health("unreachable", "connection refused") and not refused.blocked
    with StandInVM([LOADING]) as plain:
        no_tls = probe("127.0.0.1", plain.port, tls=True, server_name="qb.eastus.cloudapp.azure.com")
        loading = probe("127.0.0.1", plain.port)
    assert no_tls.phase == "tls" and "WRONG_VERSION_NUMBER" in no_tls.detail
    assert no_tls.label.startswith("HTTPS not ready")
    assert loading == Health("loading", "Qwen/Qwen2.5-1.5B-Instruct")
    with NotTheService() as proxy:
        assert probe("127.0.0.1", proxy.port).phase == "starting"
    with StandInVM([PULLING]) as booting:
        assert probe("127.0.0.1", booting.port) == Health("pulling", "pulling " + IMAGE)


def test_a_deploy_nothing_can_reach_hints_at_the_detected_address(cli, capsys, monkeypatch):
    """No --allow-from: this machine's address was detected, and the VM's port times out. The wait says
    "no answer: connection timed out" and why that may be, naming the detected address."""
    monkeypatch.setattr(credentials, "discover_public_ip", lambda: ME)
    with silent_port() as port:
        code = invoke(
            "deploy-azure", "--image", IMAGE, "--name", "qb-blocked", "--port", str(port), "--timeout", "0.3"
        )
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1
    assert "no answer: connection timed out" in out
    assert f"lets in only {ME} (this machine's public address, detected automatically)" in out
    assert "--allow-from YOUR.IP/32" in out


def test_the_wait_ends_when_the_vm_is_not_running_and_shows_the_time(cli):
    """A deallocated VM will not answer: the wait asks Azure and stops at once, saying so, instead of
    waiting out its timeout; every look reports the phase and the seconds waited."""
    options = DeployOptions(
        image=IMAGE, name="qb-test", allow_from=ME, port=free_port(), timeout=60, interval=0.05
    )
    clients, fake = connect_to(cli), cli
    prepared = prepare(options, environ={}, saved_token=lambda name: "t" * 20)
    result = provision.provision(clients, prepared, "ssh-ed25519 AAAAC3Nz test")
    target = SingleVm(clients)
    target.power_check_every = 0.2
    polls: list[tuple[str, float]] = []
    started = time.monotonic()
    fake.power_state = "deallocated"
    health = target.wait_ready(
        prepared, result, lambda h: None, lambda h, elapsed: polls.append((h.phase, elapsed))
    )
    assert health.phase == "stopped" and "qb-test-vm is deallocated" in health.detail
    assert "re-run deploy-azure" in health.detail and time.monotonic() - started < 20
    assert polls and all(b >= a for (_, a), (_, b) in zip(polls, polls[1:], strict=False))


# -- the invoke tasks, end to end against the fake ------------------------------------------------------


def deploy(
    name: str, *extra: str, image: str = IMAGE, vm: StandInVM | None = None, timeout: str = "5"
) -> int:
    """`invoke deploy-azure` of `name` from this machine's address (and to the stand-in VM's port)."""
    argv = ["deploy-azure", "--image", image, "--name", name, "--allow-from", ME, *extra]
    if vm is not None:
        argv += ["--port", str(vm.port), "--timeout", timeout]
    return invoke(*argv)


@pytest.fixture
def cli(fake, monkeypatch, tmp_path):
    """The tasks wired to the fake: clients from it, HOME in a scratch folder, a wide terminal, and a VM
    whose Caddy authority's root is VM_CA (what run-command's `cat root.crt` prints)."""
    monkeypatch.setattr(azure_cli, "connect_default", lambda subscription="": connect_to(fake))
    fake.vm_shell = vm_with_caddy
    return fake


def vm_with_caddy(script: str) -> str:
    if remote.CADDY_ROOT_CA in script:
        return VM_CA.cert_pem.bytes().decode()
    if "docker logs" in script:
        return "2026-11-25T13:00:00Z qwen-box model loaded in 41.0 s"
    return succeeding_vm(script)


def delivered_script(fake: FakeArm, name: str) -> str:
    """The script the Custom Script extension was given in protectedSettings (never returned by GET)."""
    protected = fake.protected_settings(f"{name}-rg", f"{name}-vm", arm.SECRETS_EXTENSION)
    return base64.b64decode(protected["script"]).decode()


def delivered_secrets(fake: FakeArm, name: str) -> str:
    """Everything the delivered script carries, its base64 parts decoded."""
    script = delivered_script(fake, name)
    return script + "\n".join(
        base64.b64decode(m).decode(errors="replace")
        for m in re.findall(r"printf %s ([A-Za-z0-9+/=]+)", script)
    )


def custom_files(fake: FakeArm, name: str) -> dict[str, str]:
    text = base64.b64decode(fake.custom_data(f"{name}-rg", f"{name}-vm")).decode()
    return {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}


def test_deploy_status_logs_destroy_through_invoke(cli, capsys, monkeypatch):
    vm = StandInVM([PULLING, LOADING, OK], tls=True)
    try:
        code = deploy("qb-e2e", "--env", "DTYPE=float32", "--size", "Standard_D4s_v5", vm=vm, timeout="10")
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"Ready: https://qb-e2e.eastus.cloudapp.azure.com:{vm.port}/" in out
        for phase in ("pulling the image", "loading the model", "network security group qb-e2e-nsg"):
            assert phase in out
        assert f"only from {ME}" in out and "Caddy's own authority" in out
        assert (Path(str(cli.ca_path)).parent / "home/.ssh/qwen-box_ed25519.pub").exists()
        ca = state.ca_file("qb-e2e")
        assert ca.read_text() == VM_CA.cert_pem.bytes().decode()
        assert f"its root is saved in {ca}" in out and f'DefaultHttpxClient(verify="{ca}")' in out

        assert invoke("status-azure", "--name", "qb-e2e") == 0
        out = capsys.readouterr().out
        assert "running" in out and "Standard_D4s_v5" in out and f"TCP {vm.port} from {ME}" in out
        assert "TCP 80 from" in out and "own authority" in out
        assert "ready" in out and f"https://qb-e2e.eastus.cloudapp.azure.com:{vm.port}/" in out
        assert f"kept in {state.token_file('qb-e2e')}" in out
    finally:
        vm.stop()

    assert invoke("logs-azure", "--name", "qb-e2e", "--lines", "20") == 0
    assert "model loaded in 41.0 s" in capsys.readouterr().out
    assert "docker logs --tail 20" in cli.run_commands[-1]

    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert invoke("destroy-azure", "--name", "qb-e2e") == 1
    assert not cli.is_empty()
    assert invoke("destroy-azure", "--name", "qb-e2e", "--yes") == 0
    assert "nothing of qb-e2e is left to bill" in capsys.readouterr().out
    assert cli.is_empty()
    assert not state.token_file("qb-e2e").exists() and not ca.exists()


def test_token_is_generated_printed_once_kept_private_and_never_rotated(cli, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    vm = StandInVM([OK], tls=True)
    try:
        assert deploy("qb-tok", vm=vm) == 0
        first = capsys.readouterr().out
        saved = state.token_file("qb-tok")
        token = json.loads(saved.read_text())["access_token"]
        assert len(token) >= 43 and saved.stat().st_mode & 0o777 == 0o600
        assert saved.parent.stat().st_mode & 0o777 == 0o700
        assert first.count(token) == 1
        assert "api_key=TOKEN" in first and "asks for the token" in first
        assert delivered_script(cli, "qb-tok").count(token) == 0  # base64 in the protected script:
        assert f"ACCESS_TOKEN={token}\n" in delivered_secrets(cli, "qb-tok")
        assert token not in base64.b64decode(cli.custom_data("qb-tok-rg", "qb-tok-vm")).decode()
        assert token not in json.dumps(cli.resources) and token not in caplog.text

        # Again with a new image: the VM keeps its token, the token never travels, nothing shows it.
        assert deploy("qb-tok", image="myreg.azurecr.io/qwen-box:2.0", vm=vm) == 0
        again = capsys.readouterr().out
    finally:
        vm.stop()
    assert token not in again and f"unchanged, kept in {saved}" in again
    assert json.loads(saved.read_text())["access_token"] == token
    assert all(token not in script for script in cli.run_commands)
    assert token not in caplog.text


def test_a_given_token_is_used_and_not_echoed(cli, capsys, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "my-own-token-0123456789")
    vm = StandInVM([OK], tls=True)
    try:
        assert deploy("qb-given", vm=vm) == 0
    finally:
        vm.stop()
    assert "my-own-token-0123456789" not in capsys.readouterr().out
    assert "ACCESS_TOKEN=my-own-token-0123456789" in delivered_secrets(cli, "qb-given")
    assert "ACCESS_TOKEN" not in custom_files(cli, "qb-given")["/etc/qwen-box/service.env"]
    assert deploy("qb-given", "--token", "short", "--dry-run") == 2


def test_no_tls_keeps_plain_http_on_the_chosen_port(cli, capsys):
    vm = StandInVM([LOADING, OK])
    try:
        assert deploy("qb-plain", "--no-tls", vm=vm) == 0
    finally:
        vm.stop()
    out = capsys.readouterr().out
    assert f"Ready: http://qb-plain.eastus.cloudapp.azure.com:{vm.port}/" in out and "unencrypted" in out
    assert inbound(cli, "qb-plain") == {"allow-chat-http": (str(vm.port), (ME,))}
    files = custom_files(cli, "qb-plain")
    assert files["/etc/qwen-box/Caddyfile"] == http_caddyfile(vm.port)  # Caddy in front, plain HTTP
    assert files["/etc/qwen-box/port"] == "127.0.0.1:8000\n"
    assert "PROXY_HOPS=1" in files["/etc/qwen-box/service.env"]
    assert cli.resource("qb-plain-rg", VM, "qb-plain-vm")["tags"][arm.TLS_TAG] == "off"


def deploy_public_trusting(vm: StandInVM, monkeypatch) -> int:
    """deploy-azure --public against a stand-in VM whose certificate this machine trusts."""
    with VM_CA.cert_pem.tempfile() as bundle:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", bundle)
        return invoke(
            "deploy-azure",
            "--image",
            IMAGE,
            "--name",
            "qb-pub",
            "--public",
            "--port",
            str(vm.port),
            "--timeout",
            "5",
        )


def test_https_sets_proxy_hops_and_checks_the_certificate(cli, capsys, monkeypatch):
    """--public: a publicly trusted certificate is expected, so an untrusted one never counts as ready."""
    vm = StandInVM([OK], tls=True)
    try:
        assert (
            invoke(
                "deploy-azure",
                "--image",
                IMAGE,
                "--name",
                "qb-pub",
                "--public",
                "--port",
                str(vm.port),
                "--timeout",
                "0.5",
            )
            == 1
        )
        assert "not healthy" in capsys.readouterr().out
        assert deploy_public_trusting(vm, monkeypatch) == 0
    finally:
        vm.stop()
    out = capsys.readouterr().out
    assert "Ready: https://" in out and "Let's Encrypt" in out
    files = custom_files(cli, "qb-pub")
    assert "PROXY_HOPS=1\n" in files["/etc/qwen-box/service.env"]
    assert "tls internal" not in files["/etc/qwen-box/Caddyfile"]
    assert not state.ca_file("qb-pub").exists()


def test_a_model_that_cannot_fit_is_refused_with_what_would(cli, capsys):
    assert deploy("qb-fit", "--model", "microsoft/Phi-3-mini-4k-instruct", "--precision", "bfloat16") == 2
    out = capsys.readouterr().out
    assert "does not fit" in out and "8.2 GB" in out and "Standard_B2s has 4 GiB" in out
    assert "--size Standard_B4ms" in out and "--model TinyLlama/TinyLlama-1.1B-Chat-v1.0" in out
    assert "swap does not count" in out
    assert cli.requests == []
    assert deploy("qb-fit", "--precision", "bfloat16") == 2
    assert "--precision int8 (2.1 GB)" in capsys.readouterr().out


def test_the_default_precision_is_checked_and_the_model_goes_to_the_vm(cli, capsys):
    assert invoke("deploy-azure", "--image", IMAGE, "--name", "qb-fit", "--allow-from", ME, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "at int8 (the default)" in out and "needs about 2.1 GB; Standard_B2s leaves 3 GiB" in out
    assert deploy("qb-fit", "--dry-run", "--size", "Standard_B2ms", "--precision", "bfloat16") == 0
    assert "needs about 3.7 GB; Standard_B2ms leaves 7 GiB" in capsys.readouterr().out
    assert deploy("qb-fit", "--dry-run", "--model", "someone/Unknown-7B") == 0
    assert "not in the catalog" in capsys.readouterr().out
    assert (
        invoke(
            "deploy-azure", "--image", IMAGE, "--allow-from", ME, "--model", "./my-model-folder", "--dry-run"
        )
        == 2
    )
    vm = StandInVM([OK], tls=True)
    try:
        assert deploy("qb-model", "--model", "Qwen/Qwen2.5-0.5B-Instruct", vm=vm) == 0
    finally:
        vm.stop()
    files = custom_files(cli, "qb-model")
    assert files["/etc/qwen-box/model"] == "Qwen/Qwen2.5-0.5B-Instruct\n"
    assert "DTYPE=int8\n" in files["/etc/qwen-box/service.env"]
    assert "MODEL_ID" not in files["/etc/qwen-box/service.env"]


def test_dry_run_prints_the_plan_and_calls_nothing(cli, capsys, monkeypatch):
    def no_azure(*args, **kwargs):
        raise AssertionError("--dry-run must not connect to Azure")

    monkeypatch.setattr(azure_cli, "connect_default", no_azure)
    assert (
        invoke(
            "deploy-azure",
            "--image",
            IMAGE,
            "--name",
            "qb-plan",
            "--dry-run",
            "--region",
            "westeurope",
            "--ssh",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert cli.requests == []
    for text in (
        "qb-plan-rg",
        "Standard_B2s",
        "westeurope",
        "Ubuntu 24.04",
        "only from your public IP",
        "TCP 22 (SSH, key only)",
        "$30.37",
        "a month",
        "nothing was sent to Azure",
    ):
        assert text in out, text


def test_deploy_that_never_gets_healthy_prints_diagnostics(cli, capsys):
    vm = StandInVM([LOADING], tls=True)
    cli.vm_shell = lambda script: (
        "status: running\nqwen-box: pulling: pulling " + IMAGE if "cloud-init status --long" in script else ""
    )
    try:
        code = deploy("qb-stuck", vm=vm, timeout="0.5")
    finally:
        vm.stop()
    out = capsys.readouterr().out
    assert code == 1
    assert "not healthy after 0 s (last phase: loading the model" in out
    assert "On the VM (run-command)" in out and "qwen-box: pulling: pulling" in out
    assert "Serial console" in out and "Linux version 6.8.0-azure" in out
    assert "docker logs --tail" in cli.run_commands[-1]
    assert "destroy-azure --name qb-stuck" in out


def test_public_deploy_is_loud(cli, capsys, monkeypatch):
    vm = StandInVM([OK], tls=True)
    try:
        assert deploy_public_trusting(vm, monkeypatch) == 0
    finally:
        vm.stop()
    out = capsys.readouterr().out
    assert "WHOLE INTERNET" in out and "access token" in out
    assert inbound(cli, "qb-pub") == {
        "allow-chat-https": (str(vm.port), ("Internet",)),
        "allow-http-redirect": ("80", ("Internet",)),
    }


def test_azure_errors_reach_the_user_as_sentences(cli, capsys):
    cli.fail(
        "PUT",
        "virtualMachines",
        409,
        "OperationNotAllowed",
        "exceeding approved standardBSFamily Cores quota",
    )
    assert invoke("deploy-azure", "--image", IMAGE, "--name", "qb-quota", "--allow-from", ME) == 1
    out = capsys.readouterr().out
    assert "error:" in out and "quota exceeded" in out and "Traceback" not in out
    assert "What was created so far stays" in out  # the network, IP and NIC were


@pytest.mark.parametrize(
    "setup",
    [
        lambda fake: fake.quota.__setitem__("standardBSFamily", (10, 10)),
        lambda fake: fake.restrict_sku("Standard_B2s", "eastus"),
        lambda fake: fake.fail(
            "PUT", "resourcegroups/qb-none-rg$", 403, "AuthorizationFailed", "not allowed"
        ),
    ],
)
def test_what_was_created_stays_is_said_only_when_something_was(cli, capsys, setup):
    setup(cli)
    assert invoke("deploy-azure", "--image", IMAGE, "--name", "qb-none", "--allow-from", ME) == 1
    out = capsys.readouterr().out
    assert "error:" in out and "What was created so far stays" not in out
    assert "Nothing was created in Azure by this run." in out
    assert cli.is_empty()


def test_no_subscription_says_az_login(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(tmp_path / "no-azure-cli"))
    monkeypatch.setenv("COLUMNS", "200")
    assert invoke("status-azure", "--name", "qb-none") == 1
    assert "run `az login`" in capsys.readouterr().out


def test_bad_options_exit_2_before_anything_happens(cli, capsys):
    assert invoke("deploy-azure", "--allow-from", ME) == 2
    assert "--image is required" in capsys.readouterr().out
    assert invoke("deploy-azure", "--image", "Not An Image", "--allow-from", ME) == 2
    assert invoke("deploy-azure", "--image", IMAGE, "--allow-from", "0.0.0.0/0") == 2
    assert invoke("deploy-azure", "--image", IMAGE, "--env", "PORT=9000", "--allow-from", ME) == 2
    assert cli.requests == []


def test_your_address_is_looked_up_only_when_no_allow_from_is_given(cli, capsys, monkeypatch):
    lookups = []
    monkeypatch.setattr(credentials, "discover_public_ip", lambda: lookups.append(1) or "198.51.100.9/32")
    vm = StandInVM([OK], tls=True)
    try:
        assert (
            invoke(
                "deploy-azure",
                "--image",
                IMAGE,
                "--name",
                "qb-mine",
                "--ssh",
                "--port",
                str(vm.port),
                "--timeout",
                "5",
            )
            == 0
        )
        assert deploy("qb-mine", "--ssh", vm=vm) == 0
    finally:
        vm.stop()
    assert lookups == [1]
    rules = {
        r["name"]: r["properties"]
        for r in cli.resource("qb-mine-rg", NSG, "qb-mine-nsg")["properties"]["securityRules"]
    }
    assert rules["allow-chat-https"]["sourceAddressPrefix"] == ME
    assert rules["allow-ssh"]["sourceAddressPrefix"] == ME


def test_private_registry_login_without_showing_the_password(cli, capsys, monkeypatch):
    assert deploy("qb-reg", "--registry-user", "puller", "--dry-run") == 2
    assert "QWEN_BOX_REGISTRY_PASSWORD" in capsys.readouterr().out
    monkeypatch.setenv("QWEN_BOX_REGISTRY_PASSWORD", "pull-token-xyz")
    vm = StandInVM([OK], tls=True)
    try:
        assert deploy("qb-reg", "--registry-user", "puller", vm=vm) == 0
    finally:
        vm.stop()
    assert "pull-token-xyz" not in capsys.readouterr().out
    data = base64.b64decode(cli.custom_data("qb-reg-rg", "qb-reg-vm")).decode()
    files = {f["path"] for f in yaml.safe_load(data)["write_files"]}
    assert "pull-token-xyz" not in data and not any("registry" in f for f in files)
    assert "pull-token-xyz" in delivered_secrets(cli, "qb-reg")
    assert "myreg.azurecr.io" in data


def test_redeploy_with_another_size_resizes_the_same_vm(fake, clients):
    run_deploy(clients, deployment())
    vm_id = fake.resource("qb-test-rg", VM, "qb-test-vm")["properties"]["vmId"]
    run_deploy(clients, deployment(size="Standard_B2ms"))
    props = fake.resource("qb-test-rg", VM, "qb-test-vm")["properties"]
    assert props["hardwareProfile"]["vmSize"] == "Standard_B2ms" and props["vmId"] == vm_id
    assert props["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] is True


ALLOCATION_FAILED = (
    "Allocation failed. We do not have sufficient capacity for the requested VM size in this region."
)


@pytest.mark.reliability
def test_a_vm_whose_creation_failed_is_shown_and_recreated_keeping_its_ip(cli, capsys):
    """AllocationFailed leaves a VM in provisioningState Failed with no power state. status-azure and
    logs-azure say so (not "power state unknown", not "re-run" for nothing); the next deploy deletes the
    VM alone and creates it again, with the same public IP and the disk still deleted with the VM."""
    clients, d = connect_to(cli), deployment()
    cli.fail("PUT", "virtualMachines/qb-test-vm$", 200, "AllocationFailed", ALLOCATION_FAILED, lro=True)
    with pytest.raises(AzureActionError, match="no capacity"):
        run_deploy(clients, d)
    vm = cli.resource("qb-test-rg", VM, "qb-test-vm")
    assert vm["properties"]["provisioningState"] == "Failed"
    pip = cli.resource("qb-test-rg", "Microsoft.Network/publicIPAddresses", "qb-test-ip")

    assert invoke("status-azure", "--name", "qb-test") == 0
    out = capsys.readouterr().out
    assert "AllocationFailed" in out and "sufficient capacity" in out and "unknown" not in out
    assert "recreates the VM" in out
    assert invoke("logs-azure", "--name", "qb-test") == 1
    out = capsys.readouterr().out
    assert "AllocationFailed" in out and "starts a stopped VM" not in out
    assert cli.run_commands == []

    result = run_deploy(clients, d)
    assert result.vm_created
    vm = cli.resource("qb-test-rg", VM, "qb-test-vm")
    assert vm["properties"]["provisioningState"] == "Succeeded"
    assert vm["properties"]["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
    assert cli.count("DELETE", "virtualMachines/qb-test-vm$") == 1
    assert cli.count("DELETE", "publicIPAddresses") == 0
    assert cli.resource("qb-test-rg", "Microsoft.Network/publicIPAddresses", "qb-test-ip")["id"] == pip["id"]
    assert result.ip == pip["properties"]["ipAddress"]
    st = provision.status(clients, d, probe_health=False)
    assert st is not None and st.power == "running" and not st.failure
    run_deploy(clients, d)
    assert cli.count("DELETE", "virtualMachines/qb-test-vm$") == 1


def test_logs_of_a_stopped_vm_say_what_to_do(fake, clients):
    d = deployment()
    run_deploy(clients, d)
    fake.power_state = "deallocated"
    with pytest.raises(AzureActionError, match="is deallocated.*re-run"):
        remote.container_logs(clients, d)
    assert fake.run_commands == []


def test_a_failed_update_keeps_the_old_container_and_says_why(fake, clients):
    run_deploy(clients, deployment())
    old_tags = dict(fake.resource("qb-test-rg", VM, "qb-test-vm")["tags"])
    fake.vm_shell = lambda script: "qwen-box: pulling myreg.azurecr.io/qwen-box:9\n[stderr]\nmanifest unknown"
    with pytest.raises(AzureActionError, match="(?s)keeps running what it ran before.*manifest unknown"):
        run_deploy(clients, deployment(image="myreg.azurecr.io/qwen-box:9"))
    assert fake.resource("qb-test-rg", VM, "qb-test-vm")["tags"] == old_tags


def test_a_deploy_renders_cloud_init_once_and_looks_the_vm_up_once(cli, monkeypatch):
    renders, lookups = [], []
    render, find_vm = cloudinit.render, provision.find_vm
    monkeypatch.setattr(cloudinit, "render", lambda *a, **kw: renders.append(1) or render(*a, **kw))
    monkeypatch.setattr(provision, "find_vm", lambda *a: lookups.append(1) or find_vm(*a))
    vm = StandInVM([OK], tls=True)
    try:
        for _ in range(2):  # a new VM, then an existing one
            args = ("--name", "qb-once", "--allow-from", ME, "--port", str(vm.port), "--timeout", "5")
            assert invoke("deploy-azure", "--image", IMAGE, *args) == 0
            assert (len(renders), len(lookups)) == (1, 1)
            renders.clear()
            lookups.clear()
    finally:
        vm.stop()
    assert cli.count("PUT", "virtualMachines/qb-once-vm$") == 1


@pytest.mark.parametrize("task", ["destroy-azure", "status-azure", "logs-azure"])
def test_a_wrong_subscription_is_an_error_not_an_absent_deployment(fake, monkeypatch, capsys, task):
    """ARM answers a subscription it does not know with 404 SubscriptionNotFound: that is a typo in
    --subscription (or the wrong sign-in), never "Nothing to delete" / "no deployment" with exit 0."""
    wrong = "00000000-0000-0000-0000-00000000dead"

    def connect_wrong(subscription: str = "") -> AzureClients:
        return credentials.connect(
            Cloud(arm_endpoint=fake.url), subscription, FakeCredential(), retry=FAST, verify=fake.ca_path
        )

    monkeypatch.setattr(azure_cli, "connect_default", connect_wrong)
    extra = ["--yes"] if task == "destroy-azure" else []
    code = invoke(task, "--name", "qb-test", "--subscription", wrong, *extra)
    out = capsys.readouterr().out
    assert code != 0, out
    assert "SubscriptionNotFound" in out and "--subscription" in out
    assert "Nothing to delete" not in out and "No deployment" not in out


def test_a_subscription_of_another_tenant_says_which_sign_in_to_fix(cli, capsys):
    """ARM's 401 InvalidAuthenticationTokenTenant means the token is good but for another tenant than
    the subscription's: say that (sign in to its tenant), not "run az login again"."""
    cli.fail(
        "GET",
        "resourcegroups/qb-test-rg$",
        401,
        "InvalidAuthenticationTokenTenant",
        "The access token is from the wrong issuer 'https://sts.windows.net/other/'. It must match the "
        "tenant 'https://sts.windows.net/right/' associated with this subscription.",
    )
    code = invoke("status-azure", "--name", "qb-test")
    out = capsys.readouterr().out
    assert code != 0
    assert "another Microsoft Entra tenant" in out and "az login --tenant" in out
