"""The seams of infra/: deploy-azure's phases each callable on their own, the options' defaults coming from
the constants, the CLI flow talking to a Target only, and one --env parser for run-local and deploy-azure.

No Azure here, fake or real: these check the joints between the parts (test_azure.py runs the whole
deploy against the fake ARM), and each fails the test if anything tries to open a connection.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

import tasks
from infra import fit, image
from infra.azure import cli, credentials, deployment, sizes, state
from infra.azure.deployment import DeployOptions, PlanError, prepare, with_my_address
from infra.azure.provision import DeployResult
from infra.health import Health
from infra.settings import SettingsError, parse_env
from infra.vm import caddy, cloudinit
from tests.support.azure import invoke

IMAGE = "myreg.azurecr.io/qwen-box:1.0"
ME = "203.0.113.7/32"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails the test; saved state goes to a scratch folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("this test must not open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(credentials, "discover_public_ip", refuse)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    for name in (deployment.TOKEN_ENV, deployment.REGISTRY_PASSWORD_ENV, "ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# -- prepare: pure, and cloud-init rendered once, with no secret in it ---------------------------------


def test_prepare_sends_nothing_and_renders_cloud_init_once_without_the_token(monkeypatch):
    renders = []
    real_render = cloudinit.render
    monkeypatch.setattr(cloudinit, "render", lambda *a, **kw: renders.append(a) or real_render(*a, **kw))
    prepared = prepare(DeployOptions(image=IMAGE, name="qb-seam", allow_from=ME), environ={})
    assert len(renders) == 1
    assert len(prepared.token) >= 43 and not prepared.token_given
    assert prepared.token not in prepared.cloud_init  # it goes through the Custom Script extension
    assert prepared.deployment.env["ACCESS_TOKEN"] == prepared.token
    assert prepared.deployment.allow_from == (ME,) and prepared.deployment.name == "qb-seam"
    assert not state.token_file("qb-seam").exists()  # kept only once provisioning creates the VM
    assert prepared.token not in repr(prepared)


def test_prepare_takes_the_token_given_or_kept_and_existing_vms_keep_theirs():
    given = prepare(
        DeployOptions(image=IMAGE, name="qb-seam", allow_from=ME),
        environ={deployment.TOKEN_ENV: "a-given-token-0123456789"},
    )
    assert given.token == "a-given-token-0123456789" and given.token_given
    assert given.for_existing_vm.env["ACCESS_TOKEN"] == given.token  # delivered if not the VM's
    kept = prepare(
        DeployOptions(image=IMAGE, name="qb-seam", allow_from=ME),
        environ={},
        saved_token=lambda name: "the-kept-token-0123456789" if name == "qb-seam" else "",
    )
    assert kept.token == "the-kept-token-0123456789" and not kept.token_given
    assert "ACCESS_TOKEN" not in kept.for_existing_vm.env  # a re-deploy keeps the VM's token


def test_prepare_lets_the_service_answer_to_the_vms_name_only_unless_told_otherwise():
    prepared = prepare(DeployOptions(image=IMAGE, name="qb-hosts", allow_from=ME), environ={})
    d = prepared.deployment
    assert d.env["ALLOWED_HOSTS"] == d.fqdn == "qb-hosts.eastus.cloudapp.azure.com"
    own = prepare(
        DeployOptions(image=IMAGE, name="qb-hosts", allow_from=ME, env=("ALLOWED_HOSTS=chat.example.org",)),
        environ={},
    )
    assert own.deployment.env["ALLOWED_HOSTS"] == "chat.example.org"


def test_prepare_refuses_bad_options_before_anything_else():
    with pytest.raises(PlanError, match="--image is required"):
        prepare(DeployOptions(), environ={})
    with pytest.raises(PlanError, match="does not fit"):
        prepare(DeployOptions(image=IMAGE, model="microsoft/Phi-3-mini-4k-instruct", precision="bfloat16"))
    with pytest.raises(SettingsError, match="fixed"):
        prepare(DeployOptions(image=IMAGE, env=("PORT=9000",)), environ={})


def test_the_address_is_looked_up_only_when_the_deployment_needs_one():
    lookups = []

    def mine() -> str:
        lookups.append(1)
        return "198.51.100.9/32"

    given = prepare(DeployOptions(image=IMAGE, name="qb-seam", allow_from=ME), environ={})
    assert with_my_address(given, mine) is given and lookups == []
    public = prepare(DeployOptions(image=IMAGE, name="qb-seam", public=True), environ={})
    assert with_my_address(public, mine) is public and lookups == []
    private = prepare(DeployOptions(image=IMAGE, name="qb-seam", ssh=True), environ={})
    filled = with_my_address(private, mine)
    assert filled.deployment.allow_from == ("198.51.100.9/32",) and lookups == [1]
    assert filled.deployment.ssh_from == ("198.51.100.9/32",)
    assert filled.cloud_init == private.cloud_init


# -- the options: defaults from the constants, one list of flags ---------------------------------------


def test_deploy_options_defaults_come_from_the_constants():
    options = DeployOptions()
    assert options.region == deployment.DEFAULT_REGION == "eastus"
    assert options.size == sizes.DEFAULT_SIZE == "Standard_B2s"
    assert options.disk_gb == deployment.DEFAULT_DISK_GB == 64
    assert options.timeout == deployment.DEFAULT_TIMEOUT == 1800
    assert options.tls and not options.public and options.port == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.region = "westeurope"


def test_the_task_flags_are_the_options_fields_with_their_defaults_and_help():
    params = inspect.signature(tasks.deploy_azure.body).parameters
    flags = {name: p.default for name, p in params.items() if name != "c"}
    fields = {f.name: f.default for f in dataclasses.fields(DeployOptions) if f.metadata["help"]}
    assert flags.keys() == fields.keys()
    assert {k: v for k, v in flags.items() if k != "env"} == {k: v for k, v in fields.items() if k != "env"}
    # In a process of its own: invoke consumes a task's help texts the first time it parses its flags.
    help_text = subprocess.run(
        [sys.executable, "-m", "invoke", "--help", "deploy-azure"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(tasks.__file__).parent,
        env={**os.environ, "COLUMNS": "400"},
    ).stdout
    shown = " ".join(help_text.split())
    for flag, text in DeployOptions.flags().items():
        assert re.search(rf"--(\[no-\])?{flag}[= ]", shown) and " ".join(text.split()[:4]) in shown, flag
    assert "default eastus" in DeployOptions.flags()["region"]


def test_one_fact_one_constant():
    assert caddy.UPSTREAM == f"127.0.0.1:{image.CONTAINER_PORT}"
    assert cloudinit.LOOPBACK_PUBLISH == caddy.UPSTREAM
    script = cloudinit.start_script()
    assert f"--name {image.CONTAINER} " in script and f":{image.CONTAINER_PORT}" in script
    assert f"{image.data_volume()}:/data" in script and image.LABEL_BAKED in script
    assert fit.SYSTEM_OVERHEAD_GIB and sizes.usable_gib("Standard_B2s") == 4 - fit.SYSTEM_OVERHEAD_GIB


# -- the CLI flow talks to a Target only ---------------------------------------------------------------


class RecordingTarget:
    """A Target that answers at once and records what the deploy asked of it."""

    def __init__(self, clients):
        self.calls: list[str] = []

    def provision(self, prepared, ssh_key, progress):
        self.calls.append("provision")
        progress("a step")
        d = prepared.deployment
        return DeployResult(d.url, d.fqdn, "192.0.2.1", vm_created=True, container_updated=False)

    def wait_ready(self, prepared, result, on_phase, on_poll):
        self.calls.append("wait_ready")
        on_phase(Health("loading", "m"))
        on_poll(Health("loading", "m"), 1.0)
        return Health("ok", "m")


def test_deploy_runs_its_phases_through_the_target(tmp_path):
    targets: list[RecordingTarget] = []

    def target_for(clients):
        targets.append(RecordingTarget(clients))
        return targets[-1]

    console = Console(record=True, width=200)
    code = cli.deploy(
        DeployOptions(image=IMAGE, name="qb-seam", allow_from=ME, tls=False),
        console=console,
        connect_clients=lambda subscription: SimpleNamespace(subscription="sub-1"),
        target_for=target_for,
        ssh_dir=tmp_path / "ssh",
    )
    out = console.export_text()
    assert code == 0, out
    assert targets[0].calls == ["provision", "wait_ready"]
    assert "Ready: http://qb-seam.eastus.cloudapp.azure.com/" in out and "Access token" in out


# -- one --env parser for run-local and deploy-azure ---------------------------------------------------


@pytest.mark.parametrize(
    "pair, message",
    [("HF_TOKEN=x", "unknown service setting"), ("PORT=9000", "fixed"), ("DTYPE", "KEY=VALUE")],
)
def test_run_local_and_deploy_azure_refuse_the_same_settings(pair, message, capsys):
    with pytest.raises(SettingsError, match=message):
        parse_env([pair], environ={})
    assert invoke("run-local", "--env", pair) == 2
    local = capsys.readouterr().err
    assert invoke("deploy-azure", "--image", IMAGE, "--allow-from", ME, "--env", pair, "--dry-run") == 2
    azure = capsys.readouterr().out
    assert message in local and message in azure


def test_run_local_and_deploy_azure_accept_the_same_settings(monkeypatch):
    monkeypatch.setenv("QUEUE_SIZE", "4")
    pairs = ["DTYPE=int8", "ACCESS_TOKEN=s3cret=ok-0123456789", "QUEUE_SIZE", "HF_HUB_OFFLINE=0"]
    parsed = parse_env(pairs)
    assert parsed == {
        "DTYPE": "int8",
        "ACCESS_TOKEN": "s3cret=ok-0123456789",
        "QUEUE_SIZE": "4",
        "HF_HUB_OFFLINE": "0",
    }
    prepared = prepare(DeployOptions(image=IMAGE, name="qb-seam", allow_from=ME, env=tuple(pairs)))
    fixed = {"PROXY_HOPS": "1", "ALLOWED_HOSTS": "qb-seam.eastus.cloudapp.azure.com"}  # set by the deploy
    assert {**parsed, **fixed} == dict(prepared.deployment.env)
