"""`invoke deploy-azure | status-azure | logs-azure | destroy-azure` as the user sees them: progress and
results with rich, errors as sentences (no tracebacks for Azure's answers), an exit code.

A deploy runs in phases, each a function of its own:

    prepare(options)        infra/azure/deployment.py: validate, fit-check, render cloud-init; no network
                            (--dry-run prints the plan and stops here)
    with_my_address(...)    the deployer's public address, only when no --allow-from says who may connect
    target.provision(...)   create or converge the resources (infra/azure/target.py, provision.py)
    target.wait_ready(...)  poll the health endpoint through the phases to ok (infra/health.py)
    report(...)             the URL and access token, or the diagnostics of what did not come up

How clients are made is a parameter (`connect_clients`): the real one signs in with
DefaultAzureCredential, tests pass one that points at a fake ARM on loopback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from azure.core.exceptions import AzureError
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from infra.azure import credentials, provision, scaleset, state
from infra.azure.credentials import AzureClients, CredentialsError
from infra.azure.deployment import (
    Deployment,
    DeployOptions,
    Names,
    PlanError,
    Prepared,
    default_name,
    prepare,
    with_my_address,
)
from infra.azure.errors import AzureActionError, explain
from infra.azure.plan import make_plan, plan_lines
from infra.azure.provision import DeployResult
from infra.azure.scaleset import ScaleSet
from infra.azure.target import SingleVm, Target
from infra.health import Health, probe
from infra.settings import SettingsError
from infra.vm.cloudinit import CloudInitError

ClientFactory = Callable[[str], AzureClients]
TargetFactory = Callable[[AzureClients], Target]
CERT_SHORT = {
    "acme": "Let's Encrypt certificate",
    "acme-http": "Let's Encrypt certificate (HTTP challenge)",
    "internal": "certificate from the VM's own authority",
    "provided": "certificate delivered to every instance (generated CA, or your own)",
}


def connect_default(subscription: str = "") -> AzureClients:
    """Clients for the real Azure: endpoints from the environment, DefaultAzureCredential, subscription
    from the flag, AZURE_SUBSCRIPTION_ID or the Azure CLI profile."""
    cloud = credentials.Cloud.from_env()
    sub = credentials.resolve_subscription(subscription)
    return credentials.connect(cloud, sub, credentials.default_credential(cloud))


def _console(console: Console | None) -> Console:
    return console or Console(highlight=False)


def _quiet(_: str) -> None:
    pass


def _fail(console: Console, message: str, code: int = 1) -> int:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return code


# -- deploy-azure ------------------------------------------------------------------------------------


def deploy(
    options: DeployOptions,
    *,
    console: Console | None = None,
    connect_clients: ClientFactory | None = None,
    target_for: TargetFactory | None = None,
    ssh_dir: Path | None = None,
) -> int:
    """`invoke deploy-azure`: prepare, (unless --dry-run) provision, wait until ready, report the URL and,
    for a new VM, its access token (once)."""
    out = _console(console)
    try:
        prepared = prepare(options, dns_zone=credentials.Cloud.from_env().dns_zone)
    except (PlanError, SettingsError, CloudInitError) as exc:
        return _fail(out, str(exc), 2)
    if options.dry_run:
        show_plan(out, prepared)
        return 0
    d = prepared.deployment
    try:
        prepared = with_my_address(prepared, credentials.discover_public_ip)
        key, key_path, generated = credentials.ssh_public_key(ssh_dir)
        clients = (connect_clients or connect_default)(options.subscription)
    except (CredentialsError, PlanError) as exc:
        return _fail(out, str(exc))
    except AzureError as exc:
        return _fail(out, explain(exc, region=d.region, size=d.size, name=d.name))
    target = (target_for or (ScaleSet if d.scale_set else SingleVm))(clients)
    show_start(out, prepared, clients.subscription, key_path if generated else None)
    started = time.monotonic()
    result = _provision(out, target, prepared, key, started, clients)
    if result is None:
        return 1
    if result.container_updated:
        out.print("  the container was updated to the new image/settings")
    health = _wait_ready(out, target, prepared, result, started)
    return report(out, target, prepared, result, health)


def show_plan(out: Console, prepared: Prepared) -> None:
    """--dry-run: the plan, the model's fit, and that nothing was sent."""
    for line in plan_lines(make_plan(prepared.deployment)):
        out.print(line, highlight=False)
    out.print(f"\nModel: {prepared.model_line}. {prepared.fit.message}", highlight=False)
    out.print("\n(dry run: nothing was sent to Azure)")


def show_start(out: Console, prepared: Prepared, subscription: str, generated_key: Path | None) -> None:
    """What is about to be deployed where, who can reach it, and the warnings worth shouting."""
    d = prepared.deployment
    out.print(
        f"[bold]Deploying {d.name}[/] ({d.image} on {d.size} in {d.region}, subscription {subscription})"
    )
    out.print(f"  model: {prepared.model_line}. {prepared.fit.message}", highlight=False)
    for line in make_plan(d).exposure:
        out.print(f"  exposure: {line}")
    if d.public:
        out.print(
            Panel(
                f"--public: port {d.port} of {d.url} is open to the WHOLE INTERNET. Chatting needs "
                "the access token; anyone may still load the page and knock.",
                style="bold yellow",
            )
        )
    if not d.tls:
        out.print(
            Panel(
                "--no-tls: plain HTTP. The chat and the access token cross the network unencrypted.",
                style="bold yellow",
            )
        )
    if generated_key:
        out.print(f"  generated an SSH key for the VM: {generated_key} (private key beside it)")


def _provision(
    out: Console, target: Target, prepared: Prepared, key: str, started: float, clients: AzureClients
) -> DeployResult | None:
    """The provisioning phase with its progress lines; None (after saying why) when it failed. What was
    created stays, and the user is told so only when Azure accepted a PUT of this run (`clients.writes`):
    a refusal before any (a size or quota check, a group that is not ours) left nothing behind."""
    writes = getattr(clients, "writes", None)  # clients made without the log: assume something was
    accepted = len(writes.accepted) if writes is not None else -1
    d = prepared.deployment
    try:
        with out.status("provisioning Azure resources") as spinner:

            def step(message: str) -> None:
                out.print(f"  [dim]{_clock(started)}[/] {message}")
                spinner.update(f"provisioning: {message}")

            return target.provision(prepared, key, step)
    except (AzureActionError, AzureError) as exc:
        message = (
            str(exc)
            if isinstance(exc, AzureActionError)
            else explain(exc, region=d.region, size=d.size, name=d.name)
        )
        _fail(out, message)
        if writes is None or len(writes.accepted) > accepted:
            out.print(
                f"What was created so far stays: re-run deploy-azure (it converges) or "
                f"invoke destroy-azure --name {d.name}."
            )
        else:
            out.print("Nothing was created in Azure by this run.")
        return None


def _wait_ready(
    out: Console, target: Target, prepared: Prepared, result: DeployResult, started: float
) -> Health:
    """The health wait with its progress: a line per new phase, the spinner showing the phase and the
    time waited so far, and once the VM cannot be reached at all, why that may be (reach_hint)."""
    hinted: list[int] = []
    waiting = time.monotonic()
    with out.status("waiting for the service") as spinner:

        def phase(health: Health) -> None:
            out.print(f"  [dim]{_clock(started)}[/] {escape(health.label)}")
            if health.blocked and not hinted:
                hinted.append(1)
                out.print(f"  [dim]{escape(reach_hint(prepared))}[/]")

        def poll(health: Health, elapsed: float) -> None:
            spinner.update(f"{escape(health.label)} (waiting {_clock(waiting)}, {_clock(started)} in all)")

        return target.wait_ready(prepared, result, phase, poll)


def reach_hint(prepared: Prepared) -> str:
    """Why this machine may not reach the VM: the NSG lets in only the sources it names, and this
    machine's address, as the VM sees it, may not be one of them (it was detected automatically, or
    given; a VPN or a proxy changes it)."""
    d, options = prepared.deployment, prepared.options
    if d.public:
        return (
            f"(no connection to port {d.port}: the VM may still be booting; the NSG lets everyone in, "
            "so a firewall on this side could also block it)"
        )
    sources = ", ".join(d.allow_from) or "-"
    how = (
        "given by --allow-from"
        if options.allow_from
        else "this machine's public address, detected automatically"
    )
    return (
        f"(no connection to port {d.port}: the NSG lets in only {sources} ({how}). The VM may still be "
        "booting; if this machine reaches the Internet from another address (VPN, proxy, a new IP), "
        f"re-run with --allow-from YOUR.IP/32 (`curl -4 https://api.ipify.org` shows it))"
    )


def report(out: Console, target: Target, prepared: Prepared, result: DeployResult, health: Health) -> int:
    """The end of a deploy: the URL and how to get in when ready (exit 0), else why not and the VM's
    diagnostics (exit 1). The access token is shown only when this run created the VM with a token this
    machine chose."""
    d, options = prepared.deployment, prepared.options
    if health.phase == "ok":
        ca = _save_ca(out, target, d, result) if d.cert == "internal" else None
        if d.cert == "provided" and prepared.tls and prepared.tls.generated:
            ca = state.ca_file(d.name)  # saved when provisioning, before any instance had the certificate
        out.print(
            f"\n[bold green]Ready:[/] {result.url}  (model {health.detail})"
            if health.detail
            else f"\n[bold green]Ready:[/] {result.url}"
        )
        shown = prepared.token if result.vm_created and not prepared.token_given else ""
        _print_access(out, d, result, shown, ca)
        out.print(
            f"Status: invoke status-azure --name {d.name}    Tear down: invoke destroy-azure --name {d.name}"
        )
        return 0
    if health.phase == "error":
        why = f"the service reported an error: {health.detail}"
    elif health.phase == "stopped":
        why = health.detail
    else:
        why = f"not healthy after {int(options.timeout)} s (last phase: {health.label})"
    out.print(f"\n[bold red]{d.url} is not ready:[/] {escape(why)}. Collecting diagnostics...")
    if health.blocked:
        out.print(f"  {escape(reach_hint(prepared))}")
    if health.phase == "tls" and d.cert.startswith("acme"):
        out.print(
            "  (with HTTPS the VM answers once Caddy has its certificate: see `journalctl -u caddy` "
            "in the diagnostics)"
        )
    _print_diagnostics(out, target, d)
    if result.vm_created:
        out.print(f"The access token is saved in {state.token_file(d.name)} (readable only by you).")
    out.print(
        f"The resources are still there: re-run deploy-azure to converge, or invoke destroy-azure "
        f"--name {d.name} to remove them."
    )
    return 1


def _save_ca(out: Console, target: Target, d: Deployment, result: DeployResult) -> Path | None:
    """Fetch and keep the root of the VM's own authority, and check the VM's certificate against it."""
    try:
        with out.status("fetching the VM's root certificate (run-command)"):
            pem = target.root_certificate(d)
    except (AzureActionError, AzureError) as exc:
        out.print(f"[yellow]warning:[/] could not fetch the VM's root certificate: {exc}")
        return None
    path = state.save_ca(d.name, pem)
    check = probe(result.ip, d.port, tls=True, server_name=result.fqdn, verify=str(path))
    if check.phase != "ok":
        out.print(
            f"[yellow]warning:[/] the VM's certificate did not check out against the root it gave "
            f"({check.label}); do not trust {path} blindly."
        )
    return path


def _print_access(out: Console, d: Names, result: DeployResult, token: str, ca: Path | None) -> None:
    """The one place a generated token is ever shown, and how to use it."""
    saved = state.token_file(d.name)
    if token:
        out.print(
            f"[bold]Access token[/] (shown this once; kept in {saved}, readable only by you):",
            highlight=False,
        )
        out.print(f"  {token}", highlight=False, markup=False, soft_wrap=True)
    elif result.token_changed:
        out.print(f"Access token: changed to the one you gave, kept in {saved}.", highlight=False)
    elif saved.exists():
        out.print(f"Access token: unchanged, kept in {saved}.", highlight=False)
    else:
        out.print("Access token: unchanged (the one set when the VM was created).")
    base = result.url.rstrip("/") + "/v1"
    extra = f', http_client=DefaultHttpxClient(verify="{ca}")' if ca else ""
    out.print(
        "The chat page asks for the token once. From code (pip install openai): "
        f'OpenAI(base_url="{base}", api_key=TOKEN{extra})',
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if ca:
        out.print(
            f"The certificate is from the VM's own authority; its root is saved in {ca}. Browsers "
            "warn until you trust it (or accept the warning once); "
            f"curl --cacert {ca} {result.url}api/health",
            highlight=False,
            soft_wrap=True,
        )


def _clock(started: float) -> str:
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def _print_diagnostics(out: Console, target: Target, names: Names) -> None:
    with out.status("fetching diagnostics (run-command and boot diagnostics)"):
        sections = target.diagnostics(names)
    for title, body in sections:
        out.print(Panel(body, title=title, title_align="left"), highlight=False)


# -- status-azure, logs-azure, destroy-azure ----------------------------------------------------------


def _resolve(out: Console, clients: AzureClients, name: str) -> Names | None:
    """The deployment to act on: --name, else this machine's default, else the only one there is."""
    if name:
        return Names(name)
    found = provision.list_deployments(clients)
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


def _session(out: Console, subscription: str, connect_clients: ClientFactory | None) -> AzureClients | None:
    try:
        return (connect_clients or connect_default)(subscription)
    except CredentialsError as exc:
        _fail(out, str(exc))
        return None


def target_of(clients: AzureClients, names: Names) -> TargetFactory:
    """The kind of an existing deployment, from its resource group's tag: a scale set's says so."""
    try:
        group = provision.owned_group(clients, names)
    except AzureActionError:
        group = None  # not ours: the target refuses it again, saying why
    return ScaleSet if group is not None and scaleset.is_scale_set(group.tags) else SingleVm


Action = Callable[[AzureClients, Names, Target], int]


def _on_existing(
    out: Console,
    name: str,
    subscription: str,
    connect_clients: ClientFactory | None,
    target_for: TargetFactory | None,
    act: Action,
) -> int:
    """What status, logs and destroy share: sign in, find the deployment (--name, else this machine's,
    else the only one), its kind (one VM or a scale set), then `act` on it; Azure's refusals end as a
    sentence and exit 1."""
    clients = _session(out, subscription, connect_clients)
    if clients is None:
        return 1
    try:
        names = _resolve(out, clients, name)
        if names is None:
            return 1
        target = (target_for or target_of(clients, names))(clients)
        return act(clients, names, target)
    except AzureActionError as exc:
        return _fail(out, str(exc))
    except AzureError as exc:
        return _fail(out, explain(exc, name=name))


def status(
    *,
    name: str = "",
    subscription: str = "",
    console: Console | None = None,
    connect_clients: ClientFactory | None = None,
    target_for: TargetFactory | None = None,
) -> int:
    """`invoke status-azure`: power state, URL, exposure and health of a deployment (and of a scale set,
    its capacity and each instance's health)."""
    out = _console(console)

    def show(clients: AzureClients, names: Names, target: Target) -> int:
        ca = state.ca_file(names.name)
        st = target.status(names, ca_file=str(ca) if ca.exists() else "")
        if st is None:
            out.print(f"No deployment named {names.name!r} (resource group {names.group} does not exist).")
            return 1
        _print_status(out, names, st)
        return 0

    return _on_existing(out, name, subscription, connect_clients, target_for, show)


def _print_status(out: Console, names: Names, st: provision.Status) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("deployment", st.name)
    table.add_row("region", st.region)
    table.add_row("VM size", st.size or "-")
    table.add_row("power state", st.power or "-")
    if st.failure:
        table.add_row("provisioning", f"[bold red]failed[/]: {escape(st.failure)}")
    if st.capacity:
        table.add_row("instances", st.capacity)
        for i, (vm, power, verdict) in enumerate(st.instances):
            table.add_row(f"  {i}", f"{vm}: {power}, health {verdict}")
    table.add_row("URL", st.url or "-")
    table.add_row("public IP", st.ip or "-")
    table.add_row("inbound", "; ".join(st.exposure) or "-")
    table.add_row("HTTPS", CERT_SHORT.get(st.cert, st.cert) if st.cert else "off (plain HTTP)")
    saved = state.token_file(names.name)
    table.add_row("access token", f"kept in {saved}" if saved.exists() else "not kept on this machine")
    table.add_row("health", st.health.label if st.health else "not checked (VM not running)")
    out.print(table)


def logs(
    *,
    name: str = "",
    lines: int = 100,
    subscription: str = "",
    instance: str = "",
    console: Console | None = None,
    connect_clients: ClientFactory | None = None,
    target_for: TargetFactory | None = None,
) -> int:
    """`invoke logs-azure`: the container's log tail, through run-command (of a scale set's `instance`)."""
    out = _console(console)

    def show(clients: AzureClients, names: Names, target: Target) -> int:
        with out.status(f"asking {names.name} for the container log (run-command, takes ~30 s)"):
            text = target.logs(names, lines, instance) if instance else target.logs(names, lines)
        out.print(text, highlight=False, markup=False)
        return 0

    return _on_existing(out, name, subscription, connect_clients, target_for, show)


def _ask(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def destroy(
    *,
    name: str = "",
    yes: bool = False,
    subscription: str = "",
    console: Console | None = None,
    connect_clients: ClientFactory | None = None,
    confirm: Callable[[str], bool] = _ask,
    target_for: TargetFactory | None = None,
) -> int:
    """`invoke destroy-azure`: delete the deployment's resource group once confirmed; wait until gone."""
    out = _console(console)

    def delete(clients: AzureClients, names: Names, target: Target) -> int:
        if provision.owned_group(clients, names) is None:
            out.print(f"Nothing to delete: resource group {names.group} does not exist.")
            return 0
        if not yes and not confirm(
            f"Delete resource group {names.group} and everything in it (VM, disk, IP, network"
            f"{', database' if isinstance(target, ScaleSet) else ''})? [y/N] "
        ):
            out.print("Not deleted (answer y, or pass --yes).")
            return 1
        started = time.monotonic()
        with out.status(f"deleting {names.group} (takes a few minutes)"):
            target.destroy(names, _quiet)
        state.forget(names.name)
        out.print(f"Deleted {names.group} in {_clock(started)}: nothing of {names.name} is left to bill.")
        return 0

    return _on_existing(out, name, subscription, connect_clients, target_for, delete)
