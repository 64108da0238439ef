"""A VM's file system under a scratch folder, with recording stand-ins for the commands the first-boot
scripts call (apt-get, systemctl, docker, ...), so tests run those scripts for real and read what they
did. The scripts honour QWEN_BOX_* variables for every path they touch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

STUB = """#!/bin/bash
{ printf '%s' "$(basename "$0")"; printf ' %s' "$@"; printf '\\n'; } >> "$CALLS"
if [ "$(basename "$0")" = docker ] && [ "$1" = login ]; then echo "stdin: $(cat)" >> "$CALLS"; fi
if [ "$(basename "$0")" = systemctl ] && [ "$1" = is-active ]; then exit 1; fi
if [ "$(basename "$0")" = docker ] && [ "$1" = pull ] && [ -n "${FAIL_PULL:-}" ]; then exit 1; fi
if [ "$(basename "$0")" = shred ]; then rm -f "${@: -1}"; fi
if [ "$(basename "$0")" = docker ] && [ "$1" = image ]; then echo "${IMAGE_LABELS:-}"; fi
exit 0
"""
TOOLS = ("apt-get", "systemctl", "systemd-run", "docker", "shred", "python3")


def write_files(text: str) -> dict[str, str]:
    """cloud-init's write_files of a rendered config: path -> content."""
    return {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}


def lay_out(root: Path, text: str) -> dict[str, str]:
    """Write the rendered config's files under `root` and the stand-ins into root/stubs; returns the
    environment to run the scripts with (calls recorded in root/calls.log)."""
    for path, content in write_files(text).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(0o755 if path.endswith(".sh") else 0o600)
    bindir = root / "stubs"
    bindir.mkdir(exist_ok=True)
    for tool in TOOLS:
        (bindir / tool).write_text(STUB)
        (bindir / tool).chmod(0o755)
    (root / "etc/caddy").mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "CALLS": str(root / "calls.log"),
        "QWEN_BOX_ETC": str(root / "etc/qwen-box"),
        "QWEN_BOX_OPT": str(root / "opt/qwen-box"),
        "QWEN_BOX_WWW": str(root / "www"),
        "QWEN_BOX_CADDYFILE": str(root / "etc/caddy/Caddyfile"),
        "QWEN_BOX_BOOT_FINISHED": str(root / "var/lib/cloud/instance/boot-finished"),
        "QWEN_BOX_SECRETS_WAIT": "10",
    }


def run_sh(script: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a script the way the Custom Script extension does: POSIX sh (dash on Ubuntu), as given."""
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
