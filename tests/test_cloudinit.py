"""The cloud-init that a VM boots with: valid for cloud-init, valid shell, and doing what it says.

Validity is checked by the real `cloud-init schema` (Debian's package) and `bash -n`/shellcheck. The
scripts are then run for real in a scratch folder with stand-ins for apt-get, systemctl, docker, ...
on PATH that record how they were called, so the order (install, login, pull, run), the docker flags,
the progress page and the secret handling are observed rather than read off the template.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.settings import SettingsError, parse_env
from infra.vm import cloudinit
from infra.vm.caddy import caddyfile, http_caddyfile
from infra.vm.cloudinit import CloudInitError, RegistryLogin
from tests.support import standin_vm

IMAGE = "myreg.azurecr.io/qwen-box:1.2.3"
ENV = {"DTYPE": "float32", "MODEL_ID": "Qwen/Qwen2.5-0.5B-Instruct", "QUEUE_SIZE": "4"}
SECRET = "pa$$ w0rd;`rm -rf /`#'\""
TOKEN = "tok-Zx8_very-secret-access-token-0123456789"
CADDYFILE = caddyfile("qb-test.eastus.cloudapp.azure.com", "internal")


def need(tool: str) -> str:
    """The tool's path; skipped where it is missing, but a failure in CI (which installs it)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing in CI (.ci/run installs it)")
        pytest.skip(f"{tool} not installed (apt-get install {tool})")
    return path


def scripts(text: str) -> dict[str, str]:
    return standin_vm.write_files(text)


@pytest.fixture(params=["plain-http", "https-and-model"])
def rendered(request) -> str:
    if request.param == "https-and-model":
        return cloudinit.render(
            IMAGE,
            443,
            {**ENV, "ACCESS_TOKEN": TOKEN},
            caddyfile=CADDYFILE,
            model="Qwen/Qwen2.5-0.5B-Instruct",
        )
    return cloudinit.render(IMAGE, 80, ENV)


def test_cloud_init_schema_accepts_the_rendered_config(rendered, tmp_path):
    exe = need("cloud-init")
    path = tmp_path / "user-data.yaml"
    path.write_text(rendered)
    result = subprocess.run([exe, "schema", "--config-file", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_cloud_init_schema_is_a_real_check(tmp_path):
    exe = need("cloud-init")
    path = tmp_path / "bad.yaml"
    path.write_text(cloudinit.render(IMAGE, 80, ENV).replace("size: 4G", "size: four-gigs"))
    assert subprocess.run([exe, "schema", "--config-file", str(path)], capture_output=True).returncode != 0


def test_shell_parts_parse_and_pass_shellcheck(rendered, tmp_path):
    parts = {p: c for p, c in scripts(rendered).items() if p.endswith(".sh")}
    parts["update.sh"] = "#!/bin/bash\n" + cloudinit.update_script(IMAGE, 8080, ENV)
    assert {"/opt/qwen-box/provision.sh", "/opt/qwen-box/start-container.sh"} <= set(parts)
    for name, content in parts.items():
        path = tmp_path / Path(name).name
        path.write_text(content)
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None and os.environ.get("CI"):
        pytest.fail("shellcheck is missing in CI (.ci/run installs it)")
    if shellcheck:
        result = subprocess.run(
            [shellcheck, "-s", "bash", *map(str, tmp_path.glob("*.sh"))], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout
        secrets = tmp_path / "secrets.sh"
        registry = RegistryLogin("myreg.azurecr.io", "puller", SECRET)
        secrets.write_text("#!/bin/sh\n" + cloudinit.secrets_script({"ACCESS_TOKEN": TOKEN}, registry))
        result = subprocess.run([shellcheck, "-s", "sh", str(secrets)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_rendered_config_carries_image_settings_swap_and_runs_provisioning():
    data = yaml.safe_load(cloudinit.render(IMAGE, 8080, ENV))
    files = {f["path"]: f for f in data["write_files"]}
    assert files["/etc/qwen-box/image"]["content"] == IMAGE + "\n"
    assert files["/etc/qwen-box/port"]["content"] == "127.0.0.1:8000\n"  # behind Caddy, see below
    env_lines = files["/etc/qwen-box/service.env"]["content"].splitlines()
    assert [line for line in env_lines if not line.startswith("#")] == [
        "DTYPE=float32",
        "MODEL_ID=Qwen/Qwen2.5-0.5B-Instruct",
        "QUEUE_SIZE=4",
    ]
    assert data["swap"] == {"filename": "/swapfile", "size": "4G", "maxsize": "4G"}
    assert data["runcmd"] == [["bash", "/opt/qwen-box/provision.sh"]]
    assert not any("registry" in p for p in files)


def test_no_secret_is_rendered_into_custom_data():
    """The token and the registry password travel in the Custom Script extension's protected settings;
    the rendered user data (which cloud-init keeps a copy of on the VM) has neither."""
    registry = RegistryLogin("myreg.azurecr.io", "puller", SECRET)
    text = cloudinit.render(IMAGE, 443, {**ENV, "ACCESS_TOKEN": TOKEN}, caddyfile=CADDYFILE)
    assert TOKEN not in text and "ACCESS_TOKEN" not in text and SECRET not in text
    script = cloudinit.secrets_script({**ENV, "ACCESS_TOKEN": TOKEN}, registry)
    assert TOKEN not in script and SECRET not in script  # base64 there: data to the shell, never code
    assert "DTYPE" not in script  # only the secret settings
    assert SECRET not in repr(RegistryLogin("myreg.azurecr.io", "puller", SECRET))


@pytest.mark.parametrize(
    "image",
    ["", "UPPER/case:1", "a b:1", "x:1;reboot", "x:$(id)", "x\n:1", "-x:1", "ghcr.io/o/n:" + "t" * 200],
)
def test_bad_images_are_refused(image):
    with pytest.raises(CloudInitError):
        cloudinit.render(image, 80, {})


@pytest.mark.parametrize(
    "image",
    [
        "qwen-box:latest",
        "me/qwen-box",
        "ghcr.io/me/qwen-box:1.0",
        "localhost:5000/qwen_box:dev",
        "r.io/a/b@sha256:" + "a" * 64,
    ],
)
def test_good_images_are_accepted(image):
    assert cloudinit.validate_image(image) == image


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"PORT": "9000"}, "fixed"),
        ({"HOST": "127.0.0.1"}, "fixed"),
        ({"HF_TOKEN": "hf_x"}, "unknown"),
        ({"DTYPE": "float32\nPORT=1"}, "one line"),
        ({"DTYPE": " float32"}, "one line"),
    ],
)
def test_bad_settings_are_refused(env, fragment):
    with pytest.raises(CloudInitError, match=fragment):
        cloudinit.render(IMAGE, 80, env)


def test_bad_registry_login_is_refused_without_echoing_the_password():
    with pytest.raises(CloudInitError) as err:
        RegistryLogin("myreg.azurecr.io", "puller", "line1\nline2")
    assert "line1" not in str(err.value)
    with pytest.raises(CloudInitError):
        RegistryLogin("my reg", "puller", "x")


def test_parse_env_and_registry_host():
    parsed = parse_env(["DTYPE=float32", "LOG_LEVEL=debug"])
    assert parsed == {"DTYPE": "float32", "LOG_LEVEL": "debug"}
    with pytest.raises(SettingsError):
        parse_env(["DTYPE"])
    assert cloudinit.image_registry("myreg.azurecr.io/a:1") == "myreg.azurecr.io"
    assert cloudinit.image_registry("localhost:5000/a") == "localhost:5000"
    assert cloudinit.image_registry("me/qwen-box:1") is None


def test_custom_data_limit(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("#cloud-config\n# " + "x" * (64 * 1024) + "\n")
    with pytest.raises(CloudInitError, match="Azure allows"):
        cloudinit.render(IMAGE, 80, {}, template=big)


# -- running the scripts with stand-in commands ---------------------------------------------------


@pytest.fixture
def vm_root(tmp_path):
    """Lay the rendered files out under a scratch root, with recording stand-ins on PATH."""

    def lay_out(text: str) -> tuple[Path, dict[str, str]]:
        return tmp_path, standin_vm.lay_out(tmp_path, text)

    return lay_out


def test_provisioning_installs_logs_in_pulls_and_runs_in_order(vm_root):
    root, env = vm_root(cloudinit.render(IMAGE, 80, ENV))
    registry = RegistryLogin("myreg.azurecr.io", "puller", SECRET)
    assert standin_vm.run_sh(cloudinit.secrets_script(ENV, registry), env).returncode == 0
    result = subprocess.run(
        ["bash", str(root / "opt/qwen-box/provision.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    calls = (root / "calls.log").read_text().splitlines()
    order = [c.split()[0] + " " + c.split()[1] for c in calls if not c.startswith("stdin")]
    assert (
        order.index("apt-get install")
        < order.index("docker login")
        < order.index("docker pull")
        < order.index("docker run")
    )
    assert f"stdin: {SECRET}" in calls
    assert not any(SECRET in line for line in result.stdout.splitlines() + result.stderr.splitlines())
    assert not (root / "etc/qwen-box/secrets/registry-password").exists()
    run = next(c for c in calls if c.startswith("docker run"))
    assert "--restart unless-stopped" in run and "--publish 127.0.0.1:8000:8000" in run
    assert "--volume qwen-box-data:/data" in run and run.endswith(IMAGE)
    assert f"--env-file {root}/etc/qwen-box/service.env" in run
    assert "python3 -m http.server 8000 --bind 127.0.0.1" in next(
        c for c in calls if c.startswith("systemd-run")
    )
    assert "qwen-box: pulling: pulling " + IMAGE in result.stdout
    assert json.loads((root / "www/api/health").read_text())["status"] == "starting"


def test_a_failed_pull_leaves_an_error_on_the_status_page(vm_root):
    root, env = vm_root(cloudinit.render(IMAGE, 80, ENV))
    standin_vm.run_sh(cloudinit.secrets_script({}), env)
    result = subprocess.run(
        ["bash", str(root / "opt/qwen-box/provision.sh")],
        env={**env, "FAIL_PULL": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    health = json.loads((root / "www/api/health").read_text())
    assert health["status"] == "error" and "cloud-init-output.log" in health["detail"]
    assert "docker run" not in (root / "calls.log").read_text()


def test_update_pulls_first_then_rewrites_settings_and_keeps_the_secret(vm_root):
    root, env = vm_root(cloudinit.render(IMAGE, 80, ENV))
    with open(root / "etc/qwen-box/service.env", "a") as f:  # a VM made when the token was in custom data
        f.write("ACCESS_TOKEN=tok-secret\n")
    new_image = "myreg.azurecr.io/qwen-box:2.0"
    script = cloudinit.update_script(new_image, 8080, {"DTYPE": "bfloat16", "ACCESS_TOKEN": "ignored"})
    assert "tok-secret" not in script and "ignored" not in script
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(cloudinit.UPDATE_DONE)
    etc = root / "etc/qwen-box"
    assert (etc / "image").read_text().strip() == new_image
    assert (etc / "port").read_text().strip() == "127.0.0.1:8000"
    settings = (etc / "service.env").read_text().splitlines()
    assert "DTYPE=bfloat16" in settings and "ACCESS_TOKEN=tok-secret" in settings
    assert "QUEUE_SIZE=4" not in settings
    calls = [c.split()[:2] for c in (root / "calls.log").read_text().splitlines()]
    assert calls.index(["docker", "pull"]) < calls.index(["docker", "run"])
    assert "--publish 127.0.0.1:8000:8000" in (root / "calls.log").read_text()
    assert "http://:8080 {" in (root / "etc/caddy/Caddyfile").read_text()


def test_a_failed_update_pull_changes_nothing(vm_root):
    root, env = vm_root(cloudinit.render(IMAGE, 80, ENV))
    before = {p.name: p.read_text() for p in (root / "etc/qwen-box").iterdir() if p.is_file()}
    script = cloudinit.update_script("myreg.azurecr.io/qwen-box:missing", 8080, {})
    result = subprocess.run(
        ["bash", "-c", script], env={**env, "FAIL_PULL": "1"}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and cloudinit.UPDATE_DONE not in result.stdout
    assert {p.name: p.read_text() for p in (root / "etc/qwen-box").iterdir() if p.is_file()} == before
    assert "docker run" not in (root / "calls.log").read_text()


# -- HTTPS, the access token, the model ----------------------------------------------------------------


def run_provision(root: Path, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    """provision.sh, the secrets delivered first (unless they are already)."""
    if not (root / "etc/qwen-box/secrets/ready").exists():
        assert standin_vm.run_sh(cloudinit.secrets_script({}), env).returncode == 0
    result = subprocess.run(
        ["bash", str(root / "opt/qwen-box/provision.sh")],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_https_installs_caddy_with_its_config_and_keeps_the_app_on_loopback(vm_root):
    root, env = vm_root(cloudinit.render(IMAGE, 443, {**ENV, "PROXY_HOPS": "1"}, caddyfile=CADDYFILE))
    result = run_provision(root, env)
    calls = (root / "calls.log").read_text().splitlines()
    assert "apt-get install -y -q docker.io caddy" in calls
    assert (root / "etc/caddy/Caddyfile").read_text() == CADDYFILE
    run = next(c for c in calls if c.startswith("docker run"))
    assert calls.index("systemctl restart caddy") < calls.index(run)
    assert "--publish 127.0.0.1:8000:8000" in run
    status = next(c for c in calls if c.startswith("systemd-run"))
    assert "python3 -m http.server 8000 --bind 127.0.0.1" in status  # behind Caddy, like the app
    assert "PROXY_HOPS=1" in (root / "etc/qwen-box/service.env").read_text()
    assert "Caddy serves the chat port" in result.stdout


def test_plain_http_keeps_caddy_in_front_and_the_app_on_loopback(vm_root):
    """--no-tls too: Caddy holds the public port (plain HTTP) and the app listens on loopback only, so a
    few dozen slow clients cannot take all of gunicorn's threads (tests/test_proxy.py shows it)."""
    root, env = vm_root(cloudinit.render(IMAGE, 8080, ENV))
    run_provision(root, env)
    calls = (root / "calls.log").read_text().splitlines()
    assert "apt-get install -y -q docker.io caddy" in calls
    assert (root / "etc/caddy/Caddyfile").read_text() == http_caddyfile(8080)
    run = next(c for c in calls if c.startswith("docker run"))
    assert calls.index("systemctl restart caddy") < calls.index(run)
    assert "--publish 127.0.0.1:8000:8000" in run and "8080" not in run


def test_update_puts_caddy_in_front_of_a_vm_made_without_it(vm_root):
    """A --no-tls VM from before Caddy fronted plain HTTP: the update installs Caddy, moves the container
    to loopback, and only then restarts Caddy (the container held the port until then)."""
    root, env = vm_root(cloudinit.render(IMAGE, 80, ENV))
    (root / "etc/qwen-box/port").write_text("80\n")
    script = cloudinit.update_script(IMAGE, 80, ENV)
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    calls = (root / "calls.log").read_text().splitlines()
    run = next(c for c in calls if c.startswith("docker run"))
    assert "apt-get install -y -q caddy" in calls and "--publish 127.0.0.1:8000:8000" in run
    assert (
        calls.index("apt-get install -y -q caddy") < calls.index(run) < calls.index("systemctl restart caddy")
    )
    assert (root / "etc/caddy/Caddyfile").read_text() == http_caddyfile(80)


def test_the_token_reaches_only_the_root_only_secrets_file_never_the_logged_output(vm_root):
    """cloud-init copies runcmd's output to /var/log/cloud-init-output.log and the serial console (which
    boot diagnostics keeps in Azure), and the extension reports its output to Azure: the token must
    appear in none of them, only in /etc/qwen-box/secrets/service.env (0600, in a 0700 folder)."""
    text = cloudinit.render(
        IMAGE, 443, {**ENV, "ACCESS_TOKEN": TOKEN}, caddyfile=CADDYFILE, model="Qwen/Qwen2.5-0.5B-Instruct"
    )
    assert TOKEN not in text
    root, env = vm_root(text)
    delivered = standin_vm.run_sh(cloudinit.secrets_script({**ENV, "ACCESS_TOKEN": TOKEN}), env)
    assert delivered.returncode == 0 and TOKEN not in delivered.stdout + delivered.stderr
    assert delivered.stdout.strip() == cloudinit.SECRETS_DONE
    secrets = root / "etc/qwen-box/secrets"
    assert (secrets / "service.env").read_text().splitlines()[1:] == [f"ACCESS_TOKEN={TOKEN}"]
    assert (
        secrets / "service.env"
    ).stat().st_mode & 0o777 == 0o600 and secrets.stat().st_mode & 0o777 == 0o700
    result = run_provision(root, env)
    assert TOKEN not in result.stdout + result.stderr
    run = next(c for c in (root / "calls.log").read_text().splitlines() if c.startswith("docker run"))
    assert TOKEN not in run and f"--env-file {secrets}/service.env" in run  # not on a command line
    update = cloudinit.update_script(IMAGE, 443, {**ENV, "ACCESS_TOKEN": TOKEN}, caddyfile=CADDYFILE)
    assert TOKEN not in update
    result = subprocess.run(["bash", "-c", update], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and TOKEN not in result.stdout + result.stderr
    assert f"ACCESS_TOKEN={TOKEN}" in (secrets / "service.env").read_text().splitlines()
    assert "ACCESS_TOKEN" not in (root / "etc/qwen-box/service.env").read_text()


@pytest.mark.parametrize(
    "labels, expected",
    [
        ("1 Qwen/Qwen2.5-0.5B-Instruct", "--env MODEL_ID=/models/Qwen/Qwen2.5-0.5B-Instruct --log-opt"),
        (
            "1 Qwen/Qwen2.5-1.5B-Instruct",
            "--env MODEL_ID=Qwen/Qwen2.5-0.5B-Instruct --env HF_HUB_OFFLINE=0 "
            "--volume qwen-box-models:/cache",
        ),
        ("0 Qwen/Qwen2.5-0.5B-Instruct", "--env MODEL_ID=Qwen/Qwen2.5-0.5B-Instruct --env HF_HUB_OFFLINE=0"),
    ],
)
def test_the_model_is_served_baked_or_downloaded_into_a_volume(vm_root, labels, expected):
    root, env = vm_root(cloudinit.render(IMAGE, 80, ENV, model="Qwen/Qwen2.5-0.5B-Instruct"))
    result = run_provision(root, env, IMAGE_LABELS=labels)
    run = next(c for c in (root / "calls.log").read_text().splitlines() if c.startswith("docker run"))
    assert expected in run
    assert "qwen-box: model Qwen/Qwen2.5-0.5B-Instruct" in result.stdout


def test_without_a_model_the_image_chooses(vm_root):
    root, env = vm_root(cloudinit.render(IMAGE, 80, ENV))
    run_provision(root, env)
    run = next(c for c in (root / "calls.log").read_text().splitlines() if c.startswith("docker run"))
    assert "MODEL_ID" not in run and "docker image inspect" not in (root / "calls.log").read_text()


def test_update_brings_the_start_script_model_and_caddy_config_along(vm_root):
    root, env = vm_root(cloudinit.render(IMAGE, 443, ENV, caddyfile=CADDYFILE))
    (root / "etc/caddy/Caddyfile").write_text(CADDYFILE)
    (root / "opt/qwen-box/start-container.sh").write_text("#!/bin/bash\necho old script\n")
    public = caddyfile("qb-test.eastus.cloudapp.azure.com", "acme")
    script = cloudinit.update_script(IMAGE, 443, ENV, caddyfile=public, model="Qwen/Qwen2.5-3B-Instruct")
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (root / "etc/caddy/Caddyfile").read_text() == public
    assert (root / "etc/qwen-box/model").read_text() == "Qwen/Qwen2.5-3B-Instruct\n"
    assert (root / "opt/qwen-box/start-container.sh").read_text() == cloudinit.start_script()
    calls = (root / "calls.log").read_text()
    assert "systemctl restart caddy" in calls and "--publish 127.0.0.1:8000:8000" in calls
    assert "MODEL_ID=Qwen/Qwen2.5-3B-Instruct" in calls
    again = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0  # the config is unchanged now, so Caddy is not restarted again:
    assert (root / "calls.log").read_text().count("systemctl restart caddy") == 1


@pytest.mark.parametrize("model", ["/home/me/models/qwen", "./qwen", "Qwen", "a/b/c", "x/y;reboot"])
def test_models_for_the_vm_are_hub_ids(model):
    with pytest.raises(CloudInitError, match="hub id"):
        cloudinit.render(IMAGE, 80, ENV, model=model)
