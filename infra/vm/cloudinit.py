"""Render the repository's `cloud-init.yaml` template into a VM's custom_data.

Every value is validated before it goes in, and the template only ever places values in files (read by
the scripts with `cat`), never into shell text, so an odd image name or setting cannot become a command.

No secret goes into custom_data: Azure's API reference says not to put secrets there, and cloud-init
keeps a copy of it on the VM. The secret settings (the access token) and registry credentials travel in
the Custom Script extension's protectedSettings instead (`secrets_script`, sent by infra/azure/arm.py):
encrypted to the VM's own certificate, never returned by Azure's API, written by the VM agent into
/etc/qwen-box/secrets (root-only), which the first boot waits for. Nothing here logs the rendered text.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2

from infra.image import CONTAINER, CONTAINER_PORT, LABEL_BAKED, LABEL_MODEL, MODELS_DIR, data_volume
from infra.settings import PRINTABLE, SECRET_SETTINGS, SettingsError, validate_env
from infra.vm.caddy import PROVIDED_DIR, http_caddyfile

TEMPLATE = Path(__file__).resolve().parents[2] / "cloud-init.yaml"
START_SCRIPT = Path(__file__).resolve().parent / "start-container.sh.j2"
CUSTOM_DATA_LIMIT = 64 * 1024
SWAP_SIZE = "4G"

_IMAGE = re.compile(
    r"^(?:(?P<registry>(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?)/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
_HOST = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]{1,5})?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,95})/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,95})$")
LOOPBACK_PUBLISH = f"127.0.0.1:{CONTAINER_PORT}"


class CloudInitError(ValueError):
    """An input that must not go into custom_data; the message names it (never its secret value)."""


@dataclass(frozen=True)
class RegistryLogin:
    """Credentials for a private registry. `repr` hides the password so it cannot reach a log by accident."""

    server: str
    username: str
    password: str = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not _HOST.match(self.server):
            raise CloudInitError(
                f"registry server {self.server!r} is not a host name (e.g. myreg.azurecr.io)"
            )
        if not PRINTABLE.match(self.username):
            raise CloudInitError("registry user name must be printable ASCII without surrounding spaces")
        if not PRINTABLE.match(self.password):
            raise CloudInitError(
                "registry password must be printable ASCII without surrounding spaces or "
                "line breaks (its value is not shown here)"
            )


def validate_image(image: str) -> str:
    """A Docker image reference ([registry/]name[:tag][@digest]); returned unchanged if valid."""
    match = _IMAGE.match(image)
    first = match.group("registry") if match else None
    is_host = first is not None and ("." in first or ":" in first or first == "localhost")
    if len(image) > 255 or not match or (first is not None and not is_host and first != first.lower()):
        raise CloudInitError(f"--image {image!r} is not a Docker image reference (REGISTRY/NAME:TAG)")
    return image


def validate_model(model: str) -> str:
    """A Hugging Face hub id (ORG/NAME) for the VM's container, or "" for the image's own model.

    A folder on this machine means nothing on the VM, so only hub ids are accepted here.
    """
    if model and not _HUB_ID.match(model):
        raise CloudInitError(
            f"--model {model!r}: give a Hugging Face hub id (ORG/NAME, e.g. "
            "Qwen/Qwen2.5-0.5B-Instruct); a folder on this machine does not exist on the VM"
        )
    return model


def proxy_config(port: int, caddyfile: str) -> str:
    """The VM's Caddyfile: the one given (HTTPS), else plain HTTP on `port`. Caddy is in front in every
    mode, so the container is always published on loopback only (LOOPBACK_PUBLISH)."""
    return caddyfile or http_caddyfile(port)


def image_registry(image: str) -> str | None:
    """The registry host of an image reference, or None for Docker Hub."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def _settings(env: Mapping[str, str]) -> dict[str, str]:
    """The validated settings (infra/settings.py), refused as an input that must not go in."""
    try:
        return validate_env(env)
    except SettingsError as exc:
        raise CloudInitError(str(exc)) from None


def env_file(env: Mapping[str, str]) -> str:
    """The container's `--env-file` (KEY=VALUE lines, taken literally by Docker)."""
    lines = ["# qwen-box service settings (docker --env-file); written by invoke deploy-azure"]
    lines += [f"{k}={v}" for k, v in sorted(env.items())]
    return "\n".join(lines)


def config_digest(
    image: str, port: int, env: Mapping[str, str], *, caddyfile: str = "", model: str = ""
) -> str:
    """A short fingerprint of what the container runs, secrets left out, kept as a tag on the VM.

    The model and proxy config count only when set, so a VM deployed before they existed, re-deployed
    with the same options, keeps its fingerprint and is left alone.
    """
    public = {k: v for k, v in env.items() if k not in SECRET_SETTINGS}
    what: dict[str, object] = {"image": image, "port": port, "env": dict(sorted(public.items()))}
    if model:
        what["model"] = model
    if caddyfile:
        what["caddy"] = hashlib.sha256(caddyfile.encode()).hexdigest()
    blob = json.dumps(what, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def secrets_digest(salt: str, env: Mapping[str, str]) -> str:
    """A slow salted hash of the secret settings ("" if none), so a re-deploy can tell whether they
    changed without any tag revealing them."""
    secret = {k: v for k, v in env.items() if k in SECRET_SETTINGS}
    if not secret:
        return ""
    blob = json.dumps(dict(sorted(secret.items()))).encode()
    return hashlib.pbkdf2_hmac("sha256", blob, f"qwen-box:{salt}".encode(), 200_000).hex()[:32]


def registry_digest(salt: str, registry: RegistryLogin | None) -> str:
    """secrets_digest for the registry login ("" if none)."""
    if registry is None:
        return ""
    blob = json.dumps([registry.server, registry.username, registry.password]).encode()
    return hashlib.pbkdf2_hmac("sha256", blob, f"qwen-box-registry:{salt}".encode(), 200_000).hex()[:32]


SECRETS_DONE = "qwen-box: secrets delivered"
CADDY_TLS_DIR = PROVIDED_DIR
BOOT_FINISHED = "/var/lib/cloud/instance/boot-finished"


def secrets_script(
    env: Mapping[str, str],
    registry: RegistryLogin | None = None,
    tls: tuple[str, str] | None = None,
    then: str = "",
) -> str:
    """The POSIX sh script the Custom Script extension runs as root (its protectedSettings.script): the
    secret settings and the registry login into /etc/qwen-box/secrets (0700, files 0600), then `ready`.

    Only the parts given are written, so a later delivery of one part keeps the other. At first boot
    provision.sh waits for `ready` and does the rest; once the first boot is over (cloud-init's
    boot-finished), the script applies what changed itself: a new registry login is used at once, new
    secret settings restart the container (with the start script rewritten first, for a VM made before
    the secrets lived apart, whose service.env then loses its own copy of them). Values are base64 in
    the script, data to the shell; nothing secret is echoed (the extension reports its output to Azure).

    A scale set's instances also get `tls` (certificate chain, key: PEM) for Caddy, installed for it by
    provision.sh at first boot or here afterwards, and `then`, a bash script run once the first boot is
    over (the scale set's update_script: its image and settings change through this extension, which
    the rolling upgrade policy applies instance by instance).
    """
    secret = {k: v for k, v in _settings(env).items() if k in SECRET_SETTINGS}

    def put(text: str, path: str) -> str:
        data = base64.b64encode(text.encode()).decode()
        return f'printf %s {data} | base64 -d > "{path}.new" && mv "{path}.new" "{path}"'

    keys = "|".join(sorted(SECRET_SETTINGS)) or "^$"
    lines = [
        "set -eu",
        "umask 077",
        "etc=${QWEN_BOX_ETC:-/etc/qwen-box}",
        "opt=${QWEN_BOX_OPT:-/opt/qwen-box}",
        f"booted=${{QWEN_BOX_BOOT_FINISHED:-{BOOT_FINISHED}}}",
        'dir="$etc/secrets"',
        'mkdir -p "$dir"',
        'chmod 700 "$dir"',
        "restart=0",
    ]
    if secret:
        data = base64.b64encode((env_file(secret) + "\n").encode()).decode()
        lines += [
            f'printf %s {data} | base64 -d > "$dir/service.env.new"',
            'cmp -s "$dir/service.env.new" "$dir/service.env" || restart=1',
            'mv "$dir/service.env.new" "$dir/service.env"',
        ]
    if tls:
        lines += [put(tls[0], "$dir/tls.crt"), put(tls[1], "$dir/tls.key")]
    if registry:
        lines += [
            put(registry.server + "\n", "$dir/registry-server"),
            put(registry.username + "\n", "$dir/registry-username"),
            put(registry.password, "$dir/registry-password"),
        ]
    lines += [
        ': > "$dir/ready"',
        'if [ -e "$booted" ]; then',
    ]
    if registry:
        lines += [
            '  docker login --username "$(cat "$dir/registry-username")" --password-stdin '
            '"$(cat "$dir/registry-server")" < "$dir/registry-password" >/dev/null',
            '  shred --remove "$dir/registry-password"',
        ]
    if tls:
        lines += [
            f"  tls_dir=${{QWEN_BOX_CADDY_TLS:-{CADDY_TLS_DIR}}}",
            '  install -d -o caddy -g caddy -m 0700 "$tls_dir"',
            '  install -o caddy -g caddy -m 0600 "$dir/tls.crt" "$tls_dir/cert.pem"',
            '  install -o caddy -g caddy -m 0600 "$dir/tls.key" "$tls_dir/key.pem"',
            "  systemctl restart caddy",
        ]
    if then:
        lines += [
            f'  printf %s {base64.b64encode(then.encode()).decode()} | base64 -d > "$dir/update.sh"',
            '  bash "$dir/update.sh"',
        ]
    start = base64.b64encode(start_script().encode()).decode()
    lines += [
        '  if [ "$restart" = 1 ]; then',
        f'    printf %s {start} | base64 -d > "$opt/start-container.sh.new"',
        '    chmod 755 "$opt/start-container.sh.new"',
        '    mv "$opt/start-container.sh.new" "$opt/start-container.sh"',
        f'    grep -v -E \'^({keys})=\' "$etc/service.env" > "$etc/service.env.new" || true',
        '    mv "$etc/service.env.new" "$etc/service.env"',
        '    "$opt/start-container.sh" >/dev/null',
        "  fi",
        "fi",
        f'echo "{SECRETS_DONE}"',
    ]
    return "\n".join(lines) + "\n"


def _jinja() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def start_script() -> str:
    """/opt/qwen-box/start-container.sh: (re)creates the container from the files in /etc/qwen-box."""
    return (
        _jinja()
        .from_string(START_SCRIPT.read_text())
        .render(
            container=CONTAINER,
            data_volume=data_volume(),
            container_port=CONTAINER_PORT,
            models_dir=MODELS_DIR,
            label_model=LABEL_MODEL,
            label_baked=LABEL_BAKED,
        )
    )


def render(
    image: str,
    port: int,
    env: Mapping[str, str],
    template: Path = TEMPLATE,
    *,
    caddyfile: str = "",
    model: str = "",
) -> str:
    """The cloud-config text for a VM: validated inputs in, YAML out (checked against the size limit).

    cloud-init installs Caddy with `caddyfile` (HTTPS; without one, plain HTTP on `port`) and publishes
    the container on loopback only. Secret settings in `env` are left out (see `secrets_script`).
    """
    public = {k: v for k, v in _settings(env).items() if k not in SECRET_SETTINGS}
    text = (
        _jinja()
        .from_string(template.read_text())
        .render(
            image=validate_image(image),
            publish=LOOPBACK_PUBLISH,
            model=validate_model(model),
            env_file=env_file(public),
            caddyfile=proxy_config(port, caddyfile).rstrip("\n"),
            start_script=start_script().rstrip("\n"),
            swap_size=SWAP_SIZE,
        )
    )
    if len(text.encode()) > CUSTOM_DATA_LIMIT:
        raise CloudInitError(
            f"rendered cloud-init is {len(text.encode())} bytes; Azure allows {CUSTOM_DATA_LIMIT}"
        )
    return text


def custom_data(text: str) -> str:
    """Base64, as the VM's osProfile.customData wants it."""
    return base64.b64encode(text.encode()).decode()


UPDATE_DONE = "qwen-box: update done"


def update_script(
    image: str, port: int, env: Mapping[str, str], *, caddyfile: str = "", model: str = ""
) -> str:
    """A shell script that moves a running VM to a new image/settings (for run-command).

    custom_data cannot change after the VM is created, so a re-deploy with another image rewrites the
    same files cloud-init wrote and re-runs the same start script. The new image is pulled first, so a
    failed pull leaves the running container and its files as they were; the last line it prints is
    UPDATE_DONE, which run-command's caller looks for (run-command reports success whatever the exit
    code). Values travel base64-encoded, so they are data to the shell, never code. Secret settings are
    not sent (run-command scripts are not secret storage): the ones already on the VM are kept. The
    start script is rewritten too, so a VM made by an older version learns what the new files mean; the
    Caddyfile is rewritten and Caddy restarted if it changed (installed first on a VM made when plain
    HTTP had no Caddy in front).
    """
    public = {k: v for k, v in _settings(env).items() if k not in SECRET_SETTINGS}

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    keep = "|".join(sorted(SECRET_SETTINGS)) or "^$"
    lines = [
        "set -euo pipefail",
        "umask 077",
        "etc=${QWEN_BOX_ETC:-/etc/qwen-box}",
        "opt=${QWEN_BOX_OPT:-/opt/qwen-box}",
        f"image=$(echo {b64(validate_image(image))} | base64 -d)",
        'echo "qwen-box: pulling $image"',
        'docker pull --quiet "$image"',
        "caddy_conf=${QWEN_BOX_CADDYFILE:-/etc/caddy/Caddyfile}",
        'if [ ! -e "$caddy_conf" ]; then',
        '  echo "qwen-box: installing Caddy (it fronts plain HTTP too now)"',
        "  apt-get update -q",
        "  DEBIAN_FRONTEND=noninteractive apt-get install -y -q caddy",
        "  systemctl enable caddy",
        "fi",
        'printf \'%s\\n\' "$image" > "$etc/image.new"',
        f'echo {b64(LOOPBACK_PUBLISH)} | base64 -d > "$etc/port.new"',
        f'echo {b64(validate_model(model) + chr(10))} | base64 -d > "$etc/model.new"',
        f'echo {b64(start_script())} | base64 -d > "$opt/start-container.sh.new"',
        f"{{ echo {b64(env_file(public) + chr(10))} | base64 -d; "
        f'grep -E \'^({keep})=\' "$etc/service.env" || true; }} > "$etc/service.env.new"',
        'chmod 644 "$etc/image.new" "$etc/port.new" "$etc/model.new"',
        'chmod 755 "$opt/start-container.sh.new"',
        'for f in image port model service.env; do mv "$etc/$f.new" "$etc/$f"; done',
        'mv "$opt/start-container.sh.new" "$opt/start-container.sh"',
    ]
    lines += [
        f'echo {b64(proxy_config(port, caddyfile))} | base64 -d > "$etc/Caddyfile"',
        'chmod 644 "$etc/Caddyfile"',
        "restart_caddy=0",
        'if ! cmp -s "$etc/Caddyfile" "$caddy_conf"; then',
        '  install -m 0644 "$etc/Caddyfile" "$caddy_conf"',
        "  restart_caddy=1",
        "fi",
        # The container first: on a VM that served plain HTTP without Caddy it still holds the port.
        '"$opt/start-container.sh"',
        'if [ "$restart_caddy" = 1 ]; then systemctl restart caddy; fi',
        f'echo "{UPDATE_DONE}"',
    ]
    return "\n".join(lines) + "\n"
