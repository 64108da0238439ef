"""Invoke entry points: `invoke --list` shows them, `invoke --help TASK` explains one.

Thin on purpose: each task wires a command line to the package; the logic lives in `service/`.
"""

from __future__ import annotations

import sys

from invoke import Context, Exit, task


@task(help={"model": "hub id or local folder (sets MODEL_ID; default: the MODEL_ID setting)",
            "port": "port (sets PORT; default 8000)",
            "host": "address (sets HOST; default 127.0.0.1, this machine only)"})
def serve(c: Context, model: str = "", port: int = 0, host: str = "") -> None:
    """Run the chat service natively with gunicorn (no Docker): the same command the image runs."""
    env = {}
    if model:
        env["MODEL_ID"] = model
    if port:
        env["PORT"] = str(port)
    if host:
        env["HOST"] = host
    c.run(f"{sys.executable} -m service", env=env, pty=False)


@task(help={"k": "only tests matching this expression (pytest -k)",
            "browser": "include the headless-browser tests (default: yes)"})
def test(c: Context, k: str = "", browser: bool = True) -> None:
    """Run the test suite (the README's test command runs this too)."""
    args = ["-q"]
    if k:
        args += ["-k", repr(k)]
    if not browser:
        args += ["-m", "'not browser'"]
    c.run(f"{sys.executable} -m pytest {' '.join(args)}", pty=False)


# -- Azure (the logic is in infra/azure*.py; `invoke --help deploy-azure` lists every option) ----------

def _azure_exit(code: int) -> None:
    if code:
        raise Exit(code=code)


@task(name="deploy-azure", iterable=["env"], help={
    "image": "the image to run: REGISTRY/NAME:TAG (required; push it first with invoke push)",
    "name": "deployment name: resource group NAME-rg, URL NAME.REGION.cloudapp.azure.com "
            "(default: qwen-box-XXXXXX, fixed for this user and machine)",
    "region": "Azure region (default eastus)",
    "size": "VM size (default Standard_B2s: 2 vCPU, 4 GiB)",
    "allow-from": "who may reach the chat port: IP or CIDR, comma-separated (default: your public IP)",
    "public": "open the chat port to the whole Internet (say so on purpose; consider --env ACCESS_TOKEN)",
    "ssh": "open SSH (key only) from the --allow-from source or your IP (default: closed)",
    "port": "public HTTP port on the VM (default 80)",
    "disk-gb": "OS disk size in GiB (default 64)",
    "env": "service setting KEY=VALUE for the container, repeatable; KEY alone: value from your environment",
    "registry-user": "log in to the image's registry as this user; password or token from "
                     "QWEN_BOX_REGISTRY_PASSWORD",
    "subscription": "subscription id (default: AZURE_SUBSCRIPTION_ID, else the Azure CLI's default)",
    "timeout": "seconds to wait for the service to become healthy (default 1800)",
    "dry-run": "print the plan (resources, exposure, monthly cost) and change nothing",
})
def deploy_azure(c: Context, image: str = "", name: str = "", region: str = "eastus",
                 size: str = "Standard_B2s", allow_from: str = "", public: bool = False, ssh: bool = False,
                 port: int = 80, disk_gb: int = 64, env: list | None = None, registry_user: str = "",
                 subscription: str = "", timeout: float = 1800.0, dry_run: bool = False) -> None:
    """Deploy the image to an Azure VM, wait until the chat answers, print its URL (re-run converges)."""
    from infra import azure_cli

    _azure_exit(azure_cli.deploy(
        image=image, name=name, region=region, size=size, allow_from=allow_from, public=public, ssh=ssh,
        port=port, disk_gb=disk_gb, env=env or [], registry_user=registry_user, subscription=subscription,
        timeout=timeout, dry_run=dry_run))


@task(name="status-azure", help={"name": "deployment name (default: this machine's, or the only one)",
                                 "subscription": "subscription id (default as for deploy-azure)"})
def status_azure(c: Context, name: str = "", subscription: str = "") -> None:
    """Show a deployment's power state, URL, exposure and health."""
    from infra import azure_cli

    _azure_exit(azure_cli.status(name=name, subscription=subscription))


@task(name="logs-azure", help={"name": "deployment name (default: this machine's, or the only one)",
                               "lines": "how many of the last lines (default 100; Azure keeps 4 KiB at most)",
                               "subscription": "subscription id (default as for deploy-azure)"})
def logs_azure(c: Context, name: str = "", lines: int = 100, subscription: str = "") -> None:
    """Show the container's log on the VM (through run-command, no SSH needed)."""
    from infra import azure_cli

    _azure_exit(azure_cli.logs(name=name, lines=lines, subscription=subscription))


@task(name="destroy-azure", help={"name": "deployment name (default: this machine's, or the only one)",
                                  "yes": "do not ask for confirmation",
                                  "subscription": "subscription id (default as for deploy-azure)"})
def destroy_azure(c: Context, name: str = "", yes: bool = False, subscription: str = "") -> None:
    """Delete the deployment's resource group and everything in it; wait until it is gone."""
    from infra import azure_cli

    _azure_exit(azure_cli.destroy(name=name, yes=yes, subscription=subscription))
