"""A scale-set deployment (`deploy-azure --instances MIN-MAX`) against the fake ARM on loopback, through
the real SDK clients (compute, network, monitor, PostgreSQL flexible servers, private DNS).

What was created is read back from the fake's state; the health wait talks to a real local HTTPS
server standing in for the load balancer's address (127.0.0.1), with the deployment's certificate.
Nothing leaves this machine: the public-IP lookup and DefaultAzureCredential fail the test if called.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import ssl
import subprocess

import pytest
import trustme
import yaml

from infra.azure import arm, certs, scale_arm, scaleset, state
from infra.azure import cli as azure_cli
from infra.azure.credentials import AzureClients
from infra.azure.deployment import DeployOptions, PlanError, parse_instances, prepare
from infra.azure.errors import AzureActionError
from infra.health import Health
from infra.vm.caddy import caddyfile
from tests.support import standin_vm
from tests.support.azure import connect_to, invoke
from tests.support.fake_arm import FakeArm, succeeding_vm
from tests.support.health import HealthServer

pytestmark = pytest.mark.usefixtures("azure_offline")
IMAGE = "myreg.azurecr.io/qwen-box:1.0"
ME = "203.0.113.7/32"
NAME = "qb-scale"
GROUP = f"{NAME}-rg"
FQDN = f"{NAME}.eastus.cloudapp.azure.com"
VMSS = "Microsoft.Compute/virtualMachineScaleSets"
OK = (200, {"status": "ok", "model": "Qwen/Qwen2.5-1.5B-Instruct"})
LOADING = (503, {"status": "loading", "model": "Qwen/Qwen2.5-1.5B-Instruct"})


@pytest.fixture
def cli(fake, monkeypatch):
    monkeypatch.setattr(azure_cli, "connect_default", lambda subscription="": connect_to(fake))
    fake.vm_shell = lambda script: (
        "2026-12-01T11:00:00Z qwen-box model loaded in 40.0 s"
        if "docker logs" in script
        else succeeding_vm(script)
    )
    return fake


def options(**kw) -> DeployOptions:
    values: dict = dict(image=IMAGE, name=NAME, allow_from=ME, instances="2-4", env=("DTYPE=int8",))
    values.update(kw)
    return DeployOptions(**values)


def provision(clients: AzureClients, **kw):
    prepared = prepare(options(**kw), environ={})
    return prepared, scaleset.provision(clients, prepared, "ssh-ed25519 AAAAC3Nz test")


def protected_script(fake: FakeArm, name: str = NAME) -> str:
    """The secrets extension's script as the scale set's model carries it (never returned by GET)."""
    protected = fake.secrets[f"{name}-rg/{name}-vmss/extensions/{arm.SECRETS_EXTENSION}".lower()]
    text = base64.b64decode(protected["protectedSettings"]["script"]).decode()
    for _ in range(3):  # the update script inside is base64 itself, and carries its own
        found = re.findall(r"(?:printf %s|echo) ([A-Za-z0-9+/=]{8,})", text)
        text += "\n".join(base64.b64decode(m).decode(errors="replace") for m in found)
    return text


def puts(fake: FakeArm, pattern: str) -> int:
    return fake.count("PUT", pattern)


# -- the options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0", "3-2", "1-11", "11", "two", "2-", "-3", "2-4-6", ""])
def test_a_bad_instances_value_is_refused_before_any_request(cli, capsys, text):
    if text == "":
        with pytest.raises(PlanError):
            parse_instances(text)
        return
    assert (
        invoke("deploy-azure", "--image", IMAGE, "--name", NAME, "--allow-from", ME, "--instances", text) == 2
    )
    assert "--instances" in capsys.readouterr().out
    assert cli.requests == []


def test_instances_parse_min_and_max():
    assert parse_instances("2-4") == (2, 4)
    assert parse_instances("3") == (3, 3)
    assert parse_instances("1-10") == (1, 10)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--no-tls",), "HTTPS only"),
        (("--trusted-cert",), "--tls-cert"),
    ],
)
def test_what_a_scale_set_cannot_do_is_refused_up_front(cli, capsys, extra, message):
    code = invoke(
        "deploy-azure", "--image", IMAGE, "--name", NAME, "--allow-from", ME, "--instances", "2", *extra
    )
    assert code == 2 and message in capsys.readouterr().out
    assert cli.requests == []


def test_dry_run_lists_every_part_and_its_cost(cli, capsys):
    code = invoke(
        "deploy-azure",
        "--image",
        IMAGE,
        "--name",
        NAME,
        "--allow-from",
        ME,
        "--instances",
        "2-4",
        "--dry-run",
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert cli.requests == []
    for part in (
        "Network security group",
        "Virtual network",
        "Load balancer (Standard, public): qb-scale-lb",
        "NAT gateway: qb-scale-nat",
        "qb-scale-nat-ip",
        "VM scale set (Flexible): qb-scale-vmss (2 to 4 x Standard_B2s",
        "Autoscale setting: qb-scale-autoscale",
        "PostgreSQL flexible server: qb-scale-db (Burstable B1ms",
        "Private DNS zone: qb-scale.private.postgres.database.azure.com",
        "client-IP affinity",
    ):
        assert part in out, part
    costs = dict(re.findall(r"^  - ([^:\n]+): (\$[^\n]+)$", out, flags=re.M))
    assert costs["VMs Standard_B2s, one per instance (running all month)"] == "$60.74 at 2, $121.48 at 4"
    assert costs["OS disks 64 GiB Standard SSD, one per instance"] == "$9.60 at 2, $19.20 at 4"
    assert costs["Load balancer (Standard, 2 rules; plus $0.005/GB)"] == "$18.25"
    assert costs["NAT gateway (plus $0.045/GB)"] == "$32.85"
    assert costs["Standard static public IP (NAT gateway)"] == "$3.65"
    assert costs["PostgreSQL flexible server B1ms"] == "$12.41"
    assert costs["PostgreSQL storage 32 GiB"] == "$3.68"
    assert "= about $145.33 a month at 2, $215.67 at 4" in out
    assert "East US pay-as-you-go list prices; an estimate" in out


# -- what a deploy creates ------------------------------------------------------------------------------


def test_deploy_creates_every_part_of_the_scale_set(fake, clients):
    prepared, result = provision(clients)
    assert result.vm_created and result.fqdn == FQDN and result.ip == "127.0.0.1"
    r = lambda ptype, name: fake.resource(GROUP, ptype, name)  # noqa: E731
    assert fake.groups[GROUP.lower()]["tags"][scaleset.KIND_TAG] == "scale-set"

    lb = r("Microsoft.Network/loadBalancers", f"{NAME}-lb")
    assert lb["sku"]["name"] == "Standard"
    assert lb["properties"]["frontendIPConfigurations"][0]["properties"]["publicIPAddress"]["id"].endswith(
        f"/publicIPAddresses/{NAME}-ip"
    )
    rules = {x["properties"]["frontendPort"]: x["properties"] for x in lb["properties"]["loadBalancingRules"]}
    assert set(rules) == {443, 80}
    assert all(x["loadDistribution"] == "SourceIP" and x["disableOutboundSnat"] for x in rules.values())
    probe = lb["properties"]["probes"][0]["properties"]
    assert (probe["protocol"], probe["port"], probe["requestPath"]) == ("Https", 443, "/api/health")

    nat = r("Microsoft.Network/natGateways", f"{NAME}-nat")
    assert nat["properties"]["publicIpAddresses"][0]["id"].endswith(f"/{NAME}-nat-ip")
    subnets = {
        s["name"]: s["properties"]
        for s in r("Microsoft.Network/virtualNetworks", f"{NAME}-vnet")["properties"]["subnets"]
    }
    assert subnets["default"]["natGateway"]["id"] == nat["id"]
    assert (
        subnets["postgres"]["delegations"][0]["properties"]["serviceName"]
        == "Microsoft.DBforPostgreSQL/flexibleServers"
    )

    rules = {
        x["name"]: x["properties"]
        for x in r("Microsoft.Network/networkSecurityGroups", f"{NAME}-nsg")["properties"]["securityRules"]
    }
    assert rules[arm.HTTPS_RULE]["sourceAddressPrefix"] == ME
    assert rules[scale_arm.PROBE_RULE]["sourceAddressPrefix"] == "AzureLoadBalancer"
    assert "allow-ssh" not in rules

    vmss = r(VMSS, f"{NAME}-vmss")
    props = vmss["properties"]
    assert props["orchestrationMode"] == "Flexible" and vmss["sku"] == {
        "name": "Standard_B2s",
        "tier": "Standard",
        "capacity": 2,
    }
    assert props["upgradePolicy"]["mode"] == "Rolling"
    assert props["upgradePolicy"]["rollingUpgradePolicy"]["maxUnhealthyUpgradedInstancePercent"] == 0
    assert props["automaticRepairsPolicy"]["enabled"] is True
    nic = props["virtualMachineProfile"]["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]
    assert nic["ipConfigurations"][0]["properties"]["loadBalancerBackendAddressPools"][0]["id"].endswith(
        "/backendAddressPools/instances"
    )
    assert not fake.public_instances
    exts = {
        e["name"]: e["properties"] for e in props["virtualMachineProfile"]["extensionProfile"]["extensions"]
    }
    assert exts[scale_arm.HEALTH_EXTENSION]["settings"] == {
        "protocol": "https",
        "port": 443,
        "requestPath": "/api/health",
    }
    assert "protectedSettings" not in exts[arm.SECRETS_EXTENSION]
    assert len(scaleset.instances(clients, prepared.deployment)) == 2

    auto = r("Microsoft.Insights/autoscaleSettings", f"{NAME}-autoscale")["properties"]
    assert auto["targetResourceUri"] == vmss["id"]
    assert auto["profiles"][0]["capacity"] == {"minimum": "2", "maximum": "4", "default": "2"}
    assert {x["metricTrigger"]["metricName"] for x in auto["profiles"][0]["rules"]} == {"Percentage CPU"}

    db = r("Microsoft.DBforPostgreSQL/flexibleServers", f"{NAME}-db")
    assert db["sku"] == {"name": "Standard_B1ms", "tier": "Burstable"}
    assert db["properties"]["network"]["publicNetworkAccess"] == "Disabled"
    assert "administratorLoginPassword" not in db["properties"]
    tls = fake.resources[
        f"{GROUP}/Microsoft.DBforPostgreSQL/flexibleServers/{NAME}-db/configurations/require_secure_transport".lower()
    ]
    assert tls["properties"]["value"] == "on"
    zone = f"{NAME}.private.postgres.database.azure.com"
    assert db["properties"]["network"]["privateDnsZoneArmResourceId"].endswith(zone)
    link = fake.resources[
        f"{GROUP}/Microsoft.Network/privateDnsZones/{zone}/virtualNetworkLinks/{NAME}-vnet".lower()
    ]
    assert link["properties"]["virtualNetwork"]["id"].endswith(f"/virtualNetworks/{NAME}-vnet")


def test_secrets_reach_every_instance_only_through_protected_settings(fake, clients):
    prepared, _ = provision(clients)
    password = fake.db_password(GROUP, f"{NAME}-db")
    assert password and password == prepared.database_password
    script = protected_script(fake)
    url = f"DATABASE_URL=postgresql://qwenbox:{password}@{NAME}-db.postgres.database.azure.com:5432/qwenbox?sslmode=require"
    assert url in script and f"ACCESS_TOKEN={prepared.token}" in script
    assert prepared.tls is not None and prepared.tls.key in script and prepared.tls.cert in script
    custom = base64.b64decode(fake.secrets[f"{GROUP}/{NAME}-vmss".lower()]["customData"]).decode()
    for secret in (password, prepared.token, prepared.tls.key):
        assert secret not in custom
        assert all(secret not in json.dumps(body) for method, _, body in fake.bodies if method == "GET")
    files = {f["path"]: f["content"] for f in yaml.safe_load(custom)["write_files"]}
    assert (
        "tls /etc/caddy/qwen-box-tls/cert.pem /etc/caddy/qwen-box-tls/key.pem"
        in files["/etc/qwen-box/Caddyfile"]
    )
    assert "DATABASE_URL" not in files["/etc/qwen-box/service.env"]
    # The generated CA's root is saved like a single VM's; it signed the certificate for the name.
    assert state.ca_file(NAME).read_text() == prepared.tls.ca
    assert state.load_tls(NAME)["key"] == prepared.tls.key


def test_deploying_twice_converges_and_changes_only_what_changed(fake, clients):
    provision(clients)
    before = fake.resource_ids()
    tag = fake.resource(GROUP, VMSS, f"{NAME}-vmss")["tags"][scale_arm.MODEL_TAG]
    password = fake.db_password(GROUP, f"{NAME}-db")
    provision(clients)
    assert fake.resource_ids() == before
    assert puts(fake, "virtualMachineScaleSets") == 1 and puts(fake, "flexibleServers/qb-scale-db$") == 1
    assert fake.db_password(GROUP, f"{NAME}-db") == password

    fake.set_capacity(GROUP, f"{NAME}-vmss", 3)  # autoscale added one meanwhile: a re-deploy keeps it
    provision(clients, image="myreg.azurecr.io/qwen-box:1.1")
    vmss = fake.resource(GROUP, VMSS, f"{NAME}-vmss")
    assert puts(fake, "virtualMachineScaleSets") == 2 and vmss["sku"]["capacity"] == 3
    assert vmss["tags"][scale_arm.MODEL_TAG] != tag
    assert "myreg.azurecr.io/qwen-box:1.1" in protected_script(fake)
    assert puts(fake, "flexibleServers/qb-scale-db$") == 1

    provision(clients, instances="1-2")  # a lower MAX brings the capacity within it
    assert fake.resource(GROUP, VMSS, f"{NAME}-vmss")["sku"]["capacity"] == 2
    auto = fake.resource(GROUP, "Microsoft.Insights/autoscaleSettings", f"{NAME}-autoscale")
    assert auto["properties"]["profiles"][0]["capacity"] == {"minimum": "1", "maximum": "2", "default": "1"}
    assert len(scaleset.instances(clients, scaleset.Names(NAME))) == 2


def test_a_scale_set_needs_the_token_it_was_made_with(fake, clients):
    provision(clients)
    state.forget(NAME)
    with pytest.raises(AzureActionError, match="--token"):
        provision(clients)


def test_one_vm_cannot_become_a_scale_set_in_place(fake, clients):
    clients.resources.resource_groups.create_or_update(
        GROUP, {"location": "eastus", "tags": {"app": "qwen-box", "deployment": NAME}}
    )
    with pytest.raises(AzureActionError, match="is one VM, not a scale set"):
        provision(clients)


# -- Azure's failures on each new resource type ----------------------------------------------------------

NEW_TYPES = [
    "natGateways/qb-scale-nat$",
    "loadBalancers/qb-scale-lb$",
    "privateDnsZones/[^/]+$",
    "virtualNetworkLinks/",
    "flexibleServers/qb-scale-db$",
    "virtualMachineScaleSets/qb-scale-vmss$",
    "autoscaleSettings/",
]
LONG_RUNNING = [p for p in NEW_TYPES if not p.startswith("autoscale")]


@pytest.mark.parametrize("path", NEW_TYPES)
def test_429_is_waited_out_on_each_new_resource_type(fake, clients, path):
    fake.fail("PUT", path, 429, "TooManyRequests", "Too many requests", headers={"Retry-After": "0"})
    provision(clients)
    assert puts(fake, path) == 2


@pytest.mark.parametrize("path", NEW_TYPES)
def test_409_is_explained_on_each_new_resource_type(fake, clients, path):
    fake.fail("PUT", path, 409, "Conflict", "Another operation is in progress.")
    with pytest.raises(AzureActionError, match="conflict .*Another operation|wait a minute"):
        provision(clients)
    provision(clients)  # and a re-run converges
    assert fake.resource(GROUP, "Microsoft.Insights/autoscaleSettings", f"{NAME}-autoscale")


@pytest.mark.parametrize("path", NEW_TYPES)
def test_quota_is_explained_on_each_new_resource_type(fake, clients, path):
    fake.fail(
        "PUT",
        path,
        409,
        "OperationNotAllowed",
        "Operation could not be completed as it results in exceeding approved quota.",
    )
    with pytest.raises(AzureActionError, match="quota exceeded in eastus"):
        provision(clients)


@pytest.mark.parametrize("path", LONG_RUNNING)
def test_a_failed_long_running_operation_is_explained_and_a_rerun_repairs_it(fake, clients, path):
    fake.fail("PUT", path, 200, "QuotaExceeded", "Quota exceeded for regional vCPUs.", lro=True)
    with pytest.raises(AzureActionError, match="quota exceeded"):
        provision(clients)
    provision(clients)
    vmss = fake.resource(GROUP, VMSS, f"{NAME}-vmss")
    assert vmss["properties"]["provisioningState"] == "Succeeded"
    db = fake.resource(GROUP, "Microsoft.DBforPostgreSQL/flexibleServers", f"{NAME}-db")
    assert db["properties"]["provisioningState"] == "Succeeded"


def test_5xx_on_the_scale_set_is_retried(fake, clients):
    fake.fail("PUT", "virtualMachineScaleSets", 503, "ServiceUnavailable", "try later", times=2)
    provision(clients)
    assert puts(fake, "virtualMachineScaleSets") == 3


# -- certificates ------------------------------------------------------------------------------------


def test_the_generated_certificate_is_for_the_name_and_its_root_only():
    made = certs.generate(FQDN)
    again = certs.load_given(made.cert, made.key, FQDN)
    assert again.cert.strip() == made.cert.strip()
    ca = trustme.CA()
    with pytest.raises(certs.CertificateError, match="not the key"):
        certs.load_given(made.cert, ca.private_key_pem.bytes().decode(), FQDN)
    other = ca.issue_cert("other.example")
    with pytest.raises(certs.CertificateError, match="not qb-scale"):
        certs.load_given(
            other.cert_chain_pems[0].bytes().decode(), other.private_key_pem.bytes().decode(), FQDN
        )


def test_the_users_certificate_is_used_and_a_wrong_one_refused(cli, capsys, tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert(FQDN)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    prepared = prepare(options(tls_cert=str(cert), tls_key=str(key)), environ={})
    assert prepared.tls is not None and not prepared.tls.generated and prepared.tls.ca == ""
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(ca.private_key_pem.bytes())
    base = ("deploy-azure", "--image", IMAGE, "--name", NAME, "--allow-from", ME, "--instances", "2")
    assert invoke(*base, "--tls-cert", str(cert), "--tls-key", str(wrong)) == 2
    assert "not the key" in capsys.readouterr().out
    assert invoke(*base[:-2], "--tls-cert", str(cert), "--tls-key", str(key)) == 2
    assert "for a scale set" in capsys.readouterr().out
    assert cli.requests == []


def test_the_scale_sets_caddyfile_answers_probes_by_address(tmp_path):
    """Caddy's own adapter reads the config (the certificate files are only loaded at run time)."""
    path = tmp_path / "Caddyfile"
    path.write_text(caddyfile(FQDN, "provided"))
    try:
        done = subprocess.run(
            ["caddy", "adapt", "--config", str(path), "--adapter", "caddyfile"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("caddy is not installed")
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert config["apps"]["tls"]["certificates"]["load_files"][0]["certificate"].endswith(
        "qwen-box-tls/cert.pem"
    )
    text = json.dumps(config)
    assert '"/api/health"' in text and FQDN in text


# -- the tasks end to end ---------------------------------------------------------------------------------


def stand_in_with(pems: dict[str, str], replies) -> HealthServer:
    """The load balancer's address as the instances behind it answer: HTTPS with the delivered
    certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    folder = state.state_dir()
    (folder / "sc-cert.pem").write_text(pems["cert"])
    (folder / "sc-key.pem").write_text(pems["key"])
    context.load_cert_chain(folder / "sc-cert.pem", folder / "sc-key.pem")
    return HealthServer(replies, tls=context)


def test_deploy_status_logs_destroy_of_a_scale_set_through_invoke(cli, capsys, monkeypatch):
    made = certs.generate(FQDN)
    state.save_tls(NAME, made.as_dict())  # as a first deploy would have, so the stand-in can hold it
    lb = stand_in_with(made.as_dict(), [LOADING, OK])
    try:
        code = invoke(
            "deploy-azure",
            "--image",
            IMAGE,
            "--name",
            NAME,
            "--allow-from",
            ME,
            "--instances",
            "2-3",
            "--port",
            str(lb.port),
            "--env",
            "DTYPE=int8",
            "--timeout",
            "10",
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"Ready: https://{FQDN}:{lb.port}/" in out
        assert "Access token" in out and "scale set qb-scale-vmss (2 x Standard_B2s" in out
        assert (
            state.ca_file(NAME).read_text() == made.ca
            and f"its root is saved in {state.ca_file(NAME)}" in out
        )

        cli.instance_health[sorted(scaleset.instances(connect_to(cli), scaleset.Names(NAME)))[1]] = (
            "unhealthy"
        )
        assert invoke("status-azure", "--name", NAME) == 0
        out = capsys.readouterr().out
        assert "2 (autoscale 2 to 3)" in out
        assert re.search(r"0\s+qb-scale-vmss_\w{8}: running, health healthy", out)
        assert re.search(r"1\s+qb-scale-vmss_\w{8}: running, health unhealthy", out)
        assert "ready" in out and f"TCP {lb.port} from {ME}" in out
    finally:
        lb.stop()

    second = sorted(scaleset.instances(connect_to(cli), scaleset.Names(NAME)))[1]
    assert invoke("logs-azure", "--name", NAME, "--instance", "1", "--lines", "5") == 0
    out = capsys.readouterr().out
    assert second in out and "model loaded in 40.0 s" in out
    assert cli.count("POST", f"virtualMachines/{second}/runCommand") == 1
    assert invoke("logs-azure", "--name", NAME, "--instance", "7") == 1
    assert "the scale set has 2" in capsys.readouterr().out

    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "n")
    assert invoke("destroy-azure", "--name", NAME) == 1
    assert "database" in asked[0] and not cli.is_empty()
    assert invoke("destroy-azure", "--name", NAME, "--yes") == 0
    assert "nothing of qb-scale is left to bill" in capsys.readouterr().out
    assert cli.is_empty()
    assert not state.token_file(NAME).exists() and not state.ca_file(NAME).exists()
    assert state.load_tls(NAME) == {}


# -- an instance's first boot and a later rollout, with stand-in commands ----------------------------------


def test_an_instance_starts_caddy_with_the_delivered_certificate_then_takes_a_new_image(tmp_path):
    """provision.sh (cloud-init) on a scale set's instance: Caddy waits for the certificate that comes
    with the secrets; once booted, the extension's next delivery moves the container to the new image."""
    prepared = prepare(options(), environ={})
    d = prepared.deployment.with_env({**prepared.deployment.env, "DATABASE_URL": "postgresql://u:p@h/db"})
    assert prepared.tls is not None
    root = tmp_path / "vm"
    env = standin_vm.lay_out(root, prepared.cloud_init)
    shim = tmp_path / "shim"  # `install -o caddy` as root on the instance; here without the owner
    shim.mkdir()
    (shim / "install").write_text(
        "#!/bin/bash\nargs=()\n"
        'while [ $# -gt 0 ]; do case "$1" in -o|-g) shift 2;; *) args+=("$1"); shift;; esac; done\n'
        'exec /usr/bin/install "${args[@]}"\n'
    )
    (shim / "install").chmod(0o755)
    env = {**env, "PATH": f"{shim}:{env['PATH']}", "QWEN_BOX_CADDY_TLS": str(root / "etc/caddy/qwen-box-tls")}
    tls = (prepared.tls.cert, prepared.tls.key)
    first = standin_vm.run_sh(scale_arm.extension_script(d, tls), env)
    assert first.returncode == 0, first.stderr
    boot = subprocess.run(
        ["bash", str(root / "opt/qwen-box/provision.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert boot.returncode == 0, boot.stderr
    assert "Caddy starts once its certificate arrives" in boot.stdout
    calls = (root / "calls.log").read_text().splitlines()
    restarts = [i for i, c in enumerate(calls) if c == "systemctl restart caddy"]
    assert len(restarts) == 1 and restarts[0] > calls.index("systemctl enable caddy")
    installed = root / "etc/caddy/qwen-box-tls"
    assert (installed / "key.pem").read_text() == prepared.tls.key
    assert oct((installed / "key.pem").stat().st_mode & 0o777) == "0o600"
    assert "DATABASE_URL=postgresql://u:p@h/db" in (root / "etc/qwen-box/secrets/service.env").read_text()
    assert "DATABASE_URL" not in (root / "etc/qwen-box/service.env").read_text()
    assert not any(prepared.tls.key.splitlines()[1] in line for line in boot.stdout.splitlines())

    (root / "var/lib/cloud/instance").mkdir(parents=True)
    (root / "var/lib/cloud/instance/boot-finished").write_text("")
    newer = dataclasses.replace(d, image="myreg.azurecr.io/qwen-box:1.1")
    later = standin_vm.run_sh(scale_arm.extension_script(newer, tls), env)
    assert later.returncode == 0, later.stderr
    assert "qwen-box: update done" in later.stdout and "qwen-box: secrets delivered" in later.stdout
    calls = (root / "calls.log").read_text().splitlines()
    assert "docker pull --quiet myreg.azurecr.io/qwen-box:1.1" in calls
    assert (root / "etc/qwen-box/image").read_text().strip() == "myreg.azurecr.io/qwen-box:1.1"


def test_a_new_token_goes_to_every_instance_through_the_model(fake, clients):
    _, first = provision(clients)
    assert not first.token_changed
    new = "a-new-token-for-every-instance-0123"
    prepared, again = provision(clients, token=new)
    assert again.token_changed and state.load_token(NAME) == new
    assert f"ACCESS_TOKEN={new}" in protected_script(fake) and puts(fake, "virtualMachineScaleSets") == 2


# -- the vCPU quota, asked before the NAT gateway, the load balancer and the database are billed ---------


def test_a_scale_set_over_its_vcpu_quota_is_refused_before_anything_is_created(fake, clients):
    """Autoscale may reach MAX (4) instances of 2 vCPUs: 8 vCPUs, with 6 free in the B family. Azure would
    refuse only the scale set's PUT, after the NAT gateway, load balancer and PostgreSQL server exist."""
    fake.quota["standardBSFamily"] = (4, 10)
    with pytest.raises(AzureActionError) as err:
        provision(clients)
    message = str(err.value)
    assert "4 x Standard_B2s (2 vCPUs each) needs 8 more vCPUs" in message
    assert "fewer --instances" in message
    assert "Sizes that fit (4 instances) in eastus: Standard_B2as_v2, Standard_D2as_v5" in message
    assert puts(fake, "natGateways|loadBalancers|flexibleServers|virtualMachineScaleSets") == 0
    assert [r for r in fake.requests if r[0] != "GET"] == [] and fake.is_empty()
    assert not state.token_file(NAME).exists()


def test_a_scale_sets_own_instances_count_as_used(fake, clients):
    """A re-deploy needs only what autoscale could add beyond the running instances (2 of 4 here)."""
    provision(clients)
    fake.quota["standardBSFamily"] = (0, 8)  # 4 in use by the two instances, 4 free: MAX fits
    fake.regional_cores = (0, 8)
    provision(clients)
    assert puts(fake, "virtualMachineScaleSets/qb-scale-vmss$") == 1
    before = [r for r in fake.requests if r[0] == "PUT"]
    with pytest.raises(AzureActionError, match="needs 8 more vCPUs"):
        provision(clients, instances="2-6")  # 12 vCPUs at most, 4 of them held: 8 more, 4 free
    assert [r for r in fake.requests if r[0] == "PUT"] == before


# -- an image change: ready once every instance runs it ----------------------------------------------------


def test_after_an_image_change_ready_waits_until_every_instance_runs_it(fake, clients, monkeypatch):
    """The load balancer's address answers ok at once after a model change (the old instances still
    run); deploy-azure waits until the rolling upgrade has reached every instance, and says which it has
    not reached when the time is up."""
    _, first = provision(clients)
    assert first.rollout_tag == ""  # a new scale set: its instances are made with the model
    fake.lagging_instances = 1
    prepared, result = provision(clients, image="myreg.azurecr.io/qwen-box:1.1")
    assert result.rollout_tag == fake.resource(GROUP, VMSS, f"{NAME}-vmss")["tags"][scale_arm.MODEL_TAG]
    monkeypatch.setattr(
        "infra.health.wait_healthy", lambda *a, **kw: Health("ok", "Qwen/Qwen2.5-1.5B-Instruct")
    )
    quick = dataclasses.replace(prepared.options, timeout=0.3, interval=0.05)
    prepared = dataclasses.replace(prepared, options=quick)
    phases: list[Health] = []
    answer = scaleset.ScaleSet(clients).wait_ready(prepared, result, phases.append, lambda h, s: None)
    tags = {
        vm: fake.extensions[f"{GROUP}/{vm}/extensions/{arm.SECRETS_EXTENSION}".lower()]["resource"]
        for vm in scaleset.instances(clients, prepared.deployment)
    }
    lagging = [vm for vm, ext in tags.items() if ext["properties"]["forceUpdateTag"] != result.rollout_tag]
    assert len(lagging) == 1
    assert answer.phase == "stopped" and f": {lagging[0]} still run the old ones" in answer.detail
    assert phases[-1].detail == "1 of 2 instances run the new model"

    fake.lagging_instances = 0
    fake.set_capacity(GROUP, f"{NAME}-vmss", 2)  # the rolling upgrade reaches the last one
    phases.clear()
    answer = scaleset.ScaleSet(clients).wait_ready(prepared, result, phases.append, lambda h, s: None)
    assert answer.phase == "ok" and phases == []
    _, again = provision(clients, image="myreg.azurecr.io/qwen-box:1.1")
    assert again.rollout_tag == ""  # unchanged: nothing rolls out, ready as the address is
