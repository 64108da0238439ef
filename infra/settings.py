"""The service settings a user passes to a container with `--env`: one parser for run-local and
deploy-azure, so both accept the same names and values and refuse the same mistakes.

The names are the service's own (service.config.Settings, upper-cased) plus HF_HUB_OFFLINE (the hub
client's switch, which a model downloaded on first start needs), less HOST and PORT: the container must
listen where its port is published, so those are set by the tasks (`--port` chooses the outside port).
`--env KEY` alone takes the value from this machine's environment, as `docker run -e KEY` does, which
keeps a secret out of shell history. Values are one line of printable ASCII: they end up in an env file
(on the VM) or a `docker run --env` argument.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping

from infra.image import CONTAINER_PORT
from service.config import Settings

# The container must listen where the port mapping points, so these two are not the user's to set.
FIXED_SETTINGS = {"HOST", "PORT"}
# DATABASE_URL: the shared history's PostgreSQL URL (a secret: it holds the password), which the service
# learns alongside this change (service/config.py); named here too so the scale set can deliver it.
DATABASE_SETTING = "DATABASE_URL"
EXTRA_SETTINGS = {"HF_HUB_OFFLINE", DATABASE_SETTING}
ALLOWED_SETTINGS = ({f.name.upper() for f in dataclasses.fields(Settings)} | EXTRA_SETTINGS) - FIXED_SETTINGS
# Settings the service keeps out of its repr (ACCESS_TOKEN): on the VM they travel only inside
# custom_data (root-only there, never returned by Azure's API), never through run-command, and they are
# never printed.
SECRET_SETTINGS = {f.name.upper() for f in dataclasses.fields(Settings) if not f.repr} | {DATABASE_SETTING}

PRINTABLE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")


class SettingsError(ValueError):
    """A setting that cannot be passed to the service; the message names it (never a secret value)."""


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """Service settings for the container: known names only, single-line printable values."""
    out = {}
    for key, value in env.items():
        if key in FIXED_SETTINGS:
            raise SettingsError(
                f"{key} is fixed in the container (it listens on 0.0.0.0:{CONTAINER_PORT}); "
                "use --port for the public port"
            )
        if key not in ALLOWED_SETTINGS:
            raise SettingsError(
                f"unknown service setting {key!r}; known: {', '.join(sorted(ALLOWED_SETTINGS))}"
            )
        if value != "" and not PRINTABLE.match(value):
            raise SettingsError(
                f"{key}: value must be one line of printable ASCII without surrounding spaces"
            )
        out[key] = value
    return out


def parse_env(pairs: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`--env KEY=VALUE` options (repeatable) into a validated mapping; `--env KEY` alone takes the value
    from the environment."""
    source = os.environ if environ is None else environ
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep:
            if key not in source:
                raise SettingsError(f"--env {key}: expected KEY=VALUE, or {key} set in the environment")
            value = source[key]
        env[key] = value.strip()
    return validate_env(env)


def shown(env: Mapping[str, str]) -> dict[str, str]:
    """Settings as they may be printed: secret values masked."""
    return {k: ("(set, hidden)" if k in SECRET_SETTINGS and v else v) for k, v in env.items()}
