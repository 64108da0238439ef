"""The Azure commands behind `invoke deploy-azure | status-azure | logs-azure | destroy-azure`.

Each function turns options into plain objects, calls `infra.azure`, and shows progress and results
with rich; it returns an exit code and prints errors as sentences (no tracebacks for Azure's answers).
How clients are made is a parameter (`connect_clients`): the real one signs in with
DefaultAzureCredential, tests pass one that points at a fake ARM on loopback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from azure.core.exceptions import AzureError
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from infra import azure, cloudinit, credentials
from infra.azure_errors import AzureActionError, explain
from infra.credentials import AzureClients, CredentialsError
from infra.plan import Deployment, Names, PlanError, default_name, make_plan, parse_sources, plan_lines

REGISTRY_PASSWORD_ENV = "QWEN_BOX_REGISTRY_PASSWORD"
DEFAULT_TIMEOUT = 1800.0
ClientFactory = Callable[[str], AzureClients]


def connect_default(subscription: str = "") -> AzureClients:
    """Clients for the real Azure: endpoints from the environment, DefaultAzureCredential, subscription
    from the flag, AZURE_SUBSCRIPTION_ID or the Azure CLI profile."""
    cloud = credentials.Cloud.from_env()
    sub = credentials.resolve_subscription(subscription)
    return credentials.connect(cloud, sub, credentials.default_credential(cloud))


def _console(console: Console | None) -> Console:
    return console or Console(highlight=False)


def _fail(console: Console, message: str, code: int = 1) -> int:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return code


def _registry(image: str, user: str) -> cloudinit.RegistryLogin | None:
    if not user:
        return None
    password = os.environ.get(REGISTRY_PASSWORD_ENV, "")
    if not password:
        raise cloudinit.CloudInitError(f"--registry-user given: put the registry password (or a pull "
                                       f"token) in the {REGISTRY_PASSWORD_ENV} environment variable")
    return cloudinit.RegistryLogin(cloudinit.image_registry(image) or "docker.io", user, password)


def deploy(*, image: str, name: str = "", region: str = "eastus", size: str = "Standard_B2s",
           allow_from: str = "", public: bool = False, ssh: bool = False, port: int = 80, disk_gb: int = 64,
           env: Sequence[str] = (), registry_user: str = "", subscription: str = "",
           timeout: float = DEFAULT_TIMEOUT, interval: float = 5.0, dry_run: bool = False,
           console: Console | None = None, connect_clients: ClientFactory | None = None,
           ssh_dir: Path | None = None) -> int:
    """`invoke deploy-azure`: plan, (unless --dry-run) create or converge, wait for health, print the URL."""
    out = _console(console)
    if not image:
        return _fail(out, "--image is required: REGISTRY/NAME:TAG of the qwen-box image (invoke push puts it "
                          "in a registry)", 2)
    try:
        d = Deployment(name=name or default_name(), image=cloudinit.validate_image(image), region=region,
                       size=size, port=port, disk_gb=disk_gb, public=public,
                       allow_from=parse_sources(allow_from) if allow_from else (), ssh=ssh,
                       env=cloudinit.parse_env(list(env)))
        registry = _registry(image, registry_user)
        cloudinit.render(d.image, d.port, d.env, registry)
    except (PlanError, cloudinit.CloudInitError) as exc:
        return _fail(out, str(exc), 2)
    if dry_run:
        for line in plan_lines(make_plan(d)):
            out.print(line, highlight=False)
        out.print("\n(dry run: nothing was sent to Azure)")
        return 0
    try:
        mine: tuple[str, ...] = ()
        if (not d.public and not d.allow_from) or (d.ssh and not d.allow_from):
            mine = (credentials.discover_public_ip(),)
        http_from = d.allow_from or (() if d.public else mine)
        d = d.with_sources(http_from, (d.allow_from or mine) if d.ssh else ())
        text = cloudinit.render(d.image, d.port, d.env, registry)
        key, key_path, generated = credentials.ssh_public_key(ssh_dir)
        clients = (connect_clients or connect_default)(subscription)
    except (CredentialsError, AzureActionError, cloudinit.CloudInitError, PlanError) as exc:
        return _fail(out, str(exc))
    plan = make_plan(d)
    out.print(f"[bold]Deploying {d.name}[/] ({d.image} on {d.size} in {d.region}, "
              f"subscription {clients.subscription})")
    for line in plan.exposure:
        out.print(f"  exposure: {line}")
    if d.public:
        guard = ("ACCESS_TOKEN is set, so chatting needs the token." if d.env.get("ACCESS_TOKEN") else
                 "No ACCESS_TOKEN: anyone who finds it can use your model and your VM's CPU. Consider "
                 "`--env ACCESS_TOKEN` (value taken from your environment).")
        out.print(Panel(f"--public: port {d.port} of {d.url} is open to the WHOLE INTERNET. {guard}",
                        style="bold yellow"))
    if generated:
        out.print(f"  generated an SSH key for the VM: {key_path} (private key beside it)")
    started = time.monotonic()
    try:
        with out.status("provisioning Azure resources") as spinner:
            def step(message: str) -> None:
                out.print(f"  [dim]{_clock(started)}[/] {message}")
                spinner.update(f"provisioning: {message}")
            result = azure.deploy(clients, d, text, key, progress=step)
    except (AzureActionError, AzureError) as exc:
        message = str(exc) if isinstance(exc, AzureActionError) else explain(
            exc, region=d.region, size=d.size, name=d.name)
        _fail(out, message)
        out.print(f"What was created so far stays: re-run deploy-azure (it converges) or "
                  f"invoke destroy-azure --name {d.name}.")
        return 1
    if result.container_updated:
        out.print("  the container was updated to the new image/settings")
    health = _wait(out, result.ip, d.port, timeout, interval, started)
    if health.phase == "ok":
        out.print(f"\n[bold green]Ready:[/] {result.url}  (model {health.detail})" if health.detail
                  else f"\n[bold green]Ready:[/] {result.url}")
        out.print(f"Status: invoke status-azure --name {d.name}    "
                  f"Tear down: invoke destroy-azure --name {d.name}")
        return 0
    why = (f"the service reported an error: {health.detail}" if health.phase == "error"
           else f"not healthy after {int(timeout)} s (last phase: {health.label})")
    out.print(f"\n[bold red]{d.url} is not ready:[/] {why}. Collecting diagnostics...")
    if health.phase == "booting" and allow_from and not d.public:
        out.print("  (the wait checks from this machine: outside --allow-from, it cannot see the VM)")
    _print_diagnostics(out, clients, d)
    out.print(f"The resources are still there: re-run deploy-azure to converge, or invoke destroy-azure "
              f"--name {d.name} to remove them.")
    return 1


def _clock(started: float) -> str:
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def _wait(out: Console, ip: str, port: int, timeout: float, interval: float, started: float) -> azure.Health:
    with out.status("waiting for the service") as spinner:
        def phase(health: azure.Health) -> None:
            out.print(f"  [dim]{_clock(started)}[/] {health.label}")
            spinner.update(health.label)
        return azure.wait_healthy(ip, port, timeout=timeout, interval=interval, on_phase=phase,
                                  probe_timeout=min(5.0, max(interval, 0.5)))


def _print_diagnostics(out: Console, clients: AzureClients, names: Names) -> None:
    with out.status("fetching diagnostics (run-command and boot diagnostics)"):
        sections = azure.diagnostics(clients, names)
    for title, body in sections:
        out.print(Panel(body, title=title, title_align="left"), highlight=False)


def _resolve(out: Console, clients: AzureClients, name: str) -> Names | None:
    """The deployment to act on: --name, else this machine's default, else the only one there is."""
    if name:
        return Names(name)
    found = azure.list_deployments(clients)
    mine = default_name()
    if any(n == mine for n, _ in found):
        return Names(mine)
    if len(found) == 1:
        return Names(found[0][0])
    if not found:
        out.print("No qwen-box deployment in this subscription.")
    else:
        out.print("Several deployments; pick one with --name: " + ", ".join(n for n, _ in found))
    return None


def _session(out: Console, subscription: str, connect_clients: ClientFactory | None):
    try:
        return (connect_clients or connect_default)(subscription)
    except CredentialsError as exc:
        _fail(out, str(exc))
        return None


def status(*, name: str = "", subscription: str = "", console: Console | None = None,
           connect_clients: ClientFactory | None = None) -> int:
    """`invoke status-azure`: power state, URL, exposure and health of a deployment."""
    out = _console(console)
    clients = _session(out, subscription, connect_clients)
    if clients is None:
        return 1
    try:
        names = _resolve(out, clients, name)
        if names is None:
            return 1
        st = azure.status(clients, names)
    except AzureActionError as exc:
        return _fail(out, str(exc))
    except AzureError as exc:
        return _fail(out, explain(exc, name=name))
    if st is None:
        out.print(f"No deployment named {names.name!r} (resource group {names.group} does not exist).")
        return 1
    table = Table(show_header=False, box=None)
    table.add_row("deployment", st.name)
    table.add_row("region", st.region)
    table.add_row("VM size", st.size or "-")
    table.add_row("power state", st.power or "-")
    table.add_row("URL", st.url or "-")
    table.add_row("public IP", st.ip or "-")
    table.add_row("inbound", "; ".join(st.exposure) or "-")
    table.add_row("health", st.health.label if st.health else "not checked (VM not running)")
    out.print(table)
    return 0


def logs(*, name: str = "", lines: int = 100, subscription: str = "", console: Console | None = None,
         connect_clients: ClientFactory | None = None) -> int:
    """`invoke logs-azure`: the container's log tail, through run-command."""
    out = _console(console)
    clients = _session(out, subscription, connect_clients)
    if clients is None:
        return 1
    try:
        names = _resolve(out, clients, name)
        if names is None:
            return 1
        with out.status(f"asking {names.vm} for the container log (run-command, takes ~30 s)"):
            text = azure.container_logs(clients, names, lines)
    except AzureActionError as exc:
        return _fail(out, str(exc))
    except AzureError as exc:
        return _fail(out, explain(exc, name=name))
    out.print(text, highlight=False, markup=False)
    return 0


def _ask(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def destroy(*, name: str = "", yes: bool = False, subscription: str = "", console: Console | None = None,
            connect_clients: ClientFactory | None = None, confirm: Callable[[str], bool] = _ask) -> int:
    """`invoke destroy-azure`: delete the deployment's resource group once confirmed; wait until gone."""
    out = _console(console)
    clients = _session(out, subscription, connect_clients)
    if clients is None:
        return 1
    try:
        names = _resolve(out, clients, name)
        if names is None:
            return 1
        if not clients.resources.resource_groups.check_existence(names.group):
            out.print(f"Nothing to delete: resource group {names.group} does not exist.")
            return 0
        if not yes and not confirm(f"Delete resource group {names.group} and everything in it "
                                   f"(VM, disk, IP, network)? [y/N] "):
            out.print("Not deleted (answer y, or pass --yes).")
            return 1
        started = time.monotonic()
        with out.status(f"deleting {names.group} (takes a few minutes)"):
            azure.destroy(clients, names)
    except AzureActionError as exc:
        return _fail(out, str(exc))
    except AzureError as exc:
        return _fail(out, explain(exc, name=name))
    out.print(f"Deleted {names.group} in {_clock(started)}: nothing of {names.name} is left to bill.")
    return 0
