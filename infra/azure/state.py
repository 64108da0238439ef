"""What this machine remembers about a deployment: its access token and, for a private one, the root of
the VM's own certificate authority.

Azure holds everything else (found by name), but the token cannot be read back from Azure: it travels
only in the Custom Script extension's protected settings, which Azure never returns. So it is kept
here, readable by this user only (0600 in a 0700 folder under the user's config folder, as ~/.azure
and ~/.docker keep their credentials), so that a re-deploy never rotates it silently and the user
can look it up later. destroy-azure deletes it with the deployment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/qwen-box/deployments`, else `~/.config/qwen-box/deployments`."""
    env = os.environ if environ is None else environ
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "qwen-box" / "deployments"


def token_file(name: str) -> Path:
    return state_dir() / f"{name}.json"


def ca_file(name: str) -> Path:
    """The root certificate of a private deployment's own certificate authority (public, not secret)."""
    return state_dir() / f"{name}-ca.pem"


def tls_file(name: str) -> str:
    """A scale set's server certificate and key (and the CA that signed it): secret, kept 0600."""
    return str(state_dir() / f"{name}-tls.json")


def _load(name: str) -> dict:
    try:
        data = json.loads(token_file(name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_private(path: Path, data: dict) -> Path:
    folder = state_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def load_secret(name: str, key: str) -> str:
    """Another secret kept beside the token (e.g. the scale set's database password), or ""."""
    value = _load(name).get(key, "")
    return value if isinstance(value, str) else ""


def save_secret(name: str, key: str, value: str) -> Path:
    """Keep `value` under `key` in the deployment's private file, beside the token."""
    return _write_private(token_file(name), {**_load(name), "name": name, key: value})


def load_tls(name: str) -> dict[str, str]:
    """The saved certificate, key and CA of a scale set ({} if none)."""
    try:
        data = json.loads(Path(tls_file(name)).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def save_tls(name: str, pems: dict[str, str]) -> Path:
    return _write_private(Path(tls_file(name)), pems)


def load_token(name: str) -> str:
    """The saved access token of deployment `name`, or "" if none is saved."""
    try:
        data = json.loads(token_file(name).read_text())
    except (OSError, ValueError):
        return ""
    token = data.get("access_token", "") if isinstance(data, dict) else ""
    return token if isinstance(token, str) else ""


def save_token(name: str, token: str) -> Path:
    """Keep the token for `name`, created 0600 from the start (never briefly readable by others)."""
    return _write_private(token_file(name), {**_load(name), "name": name, "access_token": token})


def save_ca(name: str, pem: str) -> Path:
    folder = state_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = ca_file(name)
    path.write_text(pem.strip() + "\n")
    return path


def forget(name: str) -> None:
    """Delete what is kept about `name` (its VM is gone, so its token opens nothing any more)."""
    for path in (token_file(name), ca_file(name), Path(tls_file(name))):
        path.unlink(missing_ok=True)
