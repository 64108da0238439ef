"""Secrets out of custom_data: the access token and the registry password reach the VM through the Custom
Script extension's protectedSettings, against the fake ARM through the real SDK, and the script it was
given is then run for real (POSIX sh, as the extension runs it) next to the first-boot scripts, with
stand-in commands, in a scratch folder.

What is asserted is what Azure and the VM would hold: the decoded custom_data, every body the fake ARM
received for the VM, what a GET returns, and the files and commands on the stand-in VM.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time

import pytest

from infra.azure import arm, provision, state
from infra.azure.deployment import DeployOptions, prepare
from infra.azure.errors import AzureActionError
from infra.vm import cloudinit
from tests.support import standin_vm
from tests.support.fake_arm import FakeArm

pytestmark = pytest.mark.usefixtures("azure_offline")
IMAGE = "myreg.azurecr.io/qwen-box:1.0"
ME = "203.0.113.7/32"
TOKEN = "tok-Zx8_very-secret-access-token-0123456789"
OTHER_TOKEN = "tok-another-secret-access-token-9876543210"
PASSWORD = "pull-token-Qq9_secret"
SSH = "ssh-ed25519 AAAAC3Nz test"


def prepared(token: str = TOKEN, image: str = IMAGE, registry: bool = True, **kw):
    """What `invoke deploy-azure --token T --registry-user puller` prepares (the password from the env)."""
    options = DeployOptions(
        image=image,
        name="qb-sec",
        allow_from=ME,
        token=token,
        registry_user="puller" if registry else "",
        **kw,
    )
    return prepare(options, environ={"QWEN_BOX_REGISTRY_PASSWORD": PASSWORD}, saved_token=lambda name: "")


def secret_forms(*secrets: str) -> list[str]:
    """A secret as it could leak: as is, and base64 (as custom_data and the script carry values)."""
    forms = []
    for s in secrets:
        forms += [
            s,
            base64.b64encode(s.encode()).decode()[:-4],
            base64.b64encode(f"ACCESS_TOKEN={s}".encode()).decode()[:-4],
        ]
    return forms


def vm_puts(fake: FakeArm) -> list[str]:
    return [
        json.dumps(b)
        for m, p, b in fake.bodies
        if m == "PUT" and p.lower().endswith("virtualmachines/qb-sec-vm")
    ]


def delivered(fake: FakeArm, n: int = -1) -> str:
    """The n-th script the extension was given (in protectedSettings)."""
    puts = [b for m, p, b in fake.bodies if m == "PUT" and p.endswith(f"/extensions/{arm.SECRETS_EXTENSION}")]
    return base64.b64decode(puts[n]["properties"]["protectedSettings"]["script"]).decode()


def test_no_secret_in_custom_data_nor_in_any_vm_body_azure_received(fake, clients):
    provision.provision(clients, prepared(), SSH)
    custom = base64.b64decode(fake.custom_data("qb-sec-rg", "qb-sec-vm")).decode()
    bodies = vm_puts(fake)
    assert bodies and custom.startswith("#cloud-config")
    for leak in secret_forms(TOKEN, PASSWORD):
        assert leak not in custom, "a secret is in the VM's custom_data"
        assert all(leak not in body for body in bodies), "a secret is in a VM PUT body"
        assert leak not in json.dumps(fake.resources), "a secret is readable back from Azure"
    assert "ACCESS_TOKEN" not in custom


def test_the_secrets_go_in_protected_settings_which_a_get_never_returns(fake, clients):
    provision.provision(clients, prepared(), SSH)
    ext = clients.compute.virtual_machine_extensions.get("qb-sec-rg", "qb-sec-vm", arm.SECRETS_EXTENSION)
    assert (ext.properties.publisher, ext.properties.type, ext.properties.type_handler_version) == (
        "Microsoft.Azure.Extensions",
        "CustomScript",
        "2.1",
    )
    assert ext.properties.provisioning_state == "Succeeded" and ext.properties.protected_settings is None
    assert not ext.properties.settings
    script = base64.b64decode(
        fake.protected_settings("qb-sec-rg", "qb-sec-vm", arm.SECRETS_EXTENSION)["script"]
    )
    assert script.decode() == delivered(fake)
    assert (
        fake.resource("qb-sec-rg", "Microsoft.Compute/virtualMachines", "qb-sec-vm")["tags"][arm.DELIVERY_TAG]
        == "extension"
    )
    assert json.loads(state.token_file("qb-sec").read_text())["access_token"] == TOKEN


def test_first_boot_waits_for_the_delivered_secrets_then_logs_in_and_starts(fake, clients, tmp_path):
    p = prepared()
    provision.provision(clients, p, SSH)
    custom = base64.b64decode(fake.custom_data("qb-sec-rg", "qb-sec-vm")).decode()
    env = standin_vm.lay_out(tmp_path, custom)
    boot = subprocess.Popen(
        ["bash", str(tmp_path / "opt/qwen-box/provision.sh")],
        env={**env, "QWEN_BOX_SECRETS_WAIT": "30"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        standin_vm_wait(
            lambda: (
                (tmp_path / "www/api/health").exists()
                and "secrets" in (tmp_path / "www/api/health").read_text()
            )
        )
        time.sleep(0.5)
        assert boot.poll() is None and "docker run" not in (tmp_path / "calls.log").read_text()
        ran = standin_vm.run_sh(delivered(fake), env)  # the VM agent runs the extension meanwhile
        assert ran.returncode == 0, ran.stderr
        out, err = boot.communicate(timeout=30)
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()
    assert boot.returncode == 0, err
    secrets = tmp_path / "etc/qwen-box/secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert (secrets / "service.env").stat().st_mode & 0o777 == 0o600
    assert f"ACCESS_TOKEN={TOKEN}" in (secrets / "service.env").read_text().splitlines()
    calls = (tmp_path / "calls.log").read_text()
    assert f"stdin: {PASSWORD}" in calls and not (secrets / "registry-password").exists()
    run = next(c for c in calls.splitlines() if c.startswith("docker run"))
    assert f"--env-file {secrets}/service.env" in run
    for leak in (TOKEN, PASSWORD):
        assert leak not in out + err + ran.stdout + ran.stderr + run
    assert "secrets here after" in out


def standin_vm_wait(condition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


def test_first_boot_without_its_secrets_fails_with_a_clear_status(tmp_path):
    env = standin_vm.lay_out(tmp_path, cloudinit.render(IMAGE, 443, {"ACCESS_TOKEN": TOKEN}))
    result = subprocess.run(
        ["bash", str(tmp_path / "opt/qwen-box/provision.sh")],
        env={**env, "QWEN_BOX_SECRETS_WAIT": "2"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    health = json.loads((tmp_path / "www/api/health").read_text())
    assert health["status"] == "error" and "Custom Script extension" in health["detail"]
    assert "docker run" not in (tmp_path / "calls.log").read_text()


def test_a_redeploy_keeps_the_token_and_sends_no_secret_again(fake, clients):
    provision.provision(clients, prepared(), SSH)
    again = prepare(
        DeployOptions(image="myreg.azurecr.io/qwen-box:2.0", name="qb-sec", allow_from=ME),
        environ={},
        saved_token=state.load_token,
    )
    assert provision.provision(clients, again, SSH).container_updated
    assert fake.count("PUT", "/extensions/") == 1
    assert all(TOKEN not in script for script in fake.run_commands)
    assert json.loads(state.token_file("qb-sec").read_text())["access_token"] == TOKEN


def test_a_new_token_on_redeploy_goes_through_the_extension_and_restarts_the_container(
    fake, clients, tmp_path
):
    provision.provision(clients, prepared(registry=False), SSH)
    custom = base64.b64decode(fake.custom_data("qb-sec-rg", "qb-sec-vm")).decode()
    env = standin_vm.lay_out(tmp_path, custom)
    assert standin_vm.run_sh(delivered(fake), env).returncode == 0
    boot = subprocess.run(
        ["bash", str(tmp_path / "opt/qwen-box/provision.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert boot.returncode == 0, boot.stderr
    (tmp_path / "var/lib/cloud/instance").mkdir(parents=True)
    (tmp_path / "var/lib/cloud/instance/boot-finished").write_text("done\n")

    result = provision.provision(clients, prepared(token=OTHER_TOKEN, registry=False), SSH)
    assert not result.vm_created and fake.count("PUT", "/extensions/") == 2
    assert result.token_changed  # so deploy-azure does not say "Access token: unchanged"
    assert OTHER_TOKEN not in json.dumps(vm_puts(fake)) and fake.run_commands == []
    runs = (tmp_path / "calls.log").read_text().count("docker run")
    ran = standin_vm.run_sh(delivered(fake), env)
    assert ran.returncode == 0 and OTHER_TOKEN not in ran.stdout + ran.stderr
    secret_env = (tmp_path / "etc/qwen-box/secrets/service.env").read_text()
    assert f"ACCESS_TOKEN={OTHER_TOKEN}" in secret_env and TOKEN not in secret_env
    assert (tmp_path / "calls.log").read_text().count("docker run") == runs + 1  # restarted with it
    assert json.loads(state.token_file("qb-sec").read_text())["access_token"] == OTHER_TOKEN
    again = provision.provision(clients, prepared(token=OTHER_TOKEN, registry=False), SSH)
    assert fake.count("PUT", "/extensions/") == 2 and not again.token_changed  # the same: nothing sent


def test_a_failed_delivery_is_explained_and_the_next_deploy_sends_it_again(fake, clients):
    fake.fail(
        "PUT",
        "/extensions/",
        200,
        "VMExtensionProvisioningError",
        "VM has reported a failure when processing extension 'qwen-box-secrets'.",
        lro=True,
    )
    with pytest.raises(AzureActionError, match="(?s)access token.*re-run deploy-azure"):
        provision.provision(clients, prepared(), SSH)
    again = prepare(
        DeployOptions(image=IMAGE, name="qb-sec", allow_from=ME), environ={}, saved_token=state.load_token
    )
    provision.provision(clients, again, SSH)
    assert fake.count("PUT", "/extensions/") == 2
    assert (
        f"ACCESS_TOKEN={TOKEN}"
        in base64.b64decode(delivered(fake).split("printf %s ", 1)[1].split(" ", 1)[0]).decode()
    )
