"""The Azure commands behind `invoke deploy-azure | status-azure | logs-azure | destroy-azure`.

Each function turns options into plain objects, calls `infra.azure`, and shows progress and results
with rich; it returns an exit code and prints errors as sentences (no tracebacks for Azure's answers).
How clients are made is a parameter (`connect_clients`): the real one signs in with
DefaultAzureCredential, tests pass one that points at a fake ARM on loopback.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from azure.core.exceptions import AzureError
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from infra import azure, cloudinit, credentials, fit, state
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
        raise cloudinit.CloudInitError(
            f"--registry-user given: put the registry password (or a pull "
            f"token) in the {REGISTRY_PASSWORD_ENV} environment variable"
        )
    return cloudinit.RegistryLogin(cloudinit.image_registry(image) or "docker.io", user, password)


TOKEN_ENV = "QWEN_BOX_ACCESS_TOKEN"
CERT_SHORT = {
    "acme": "Let's Encrypt certificate",
    "acme-http": "Let's Encrypt certificate (HTTP challenge)",
    "internal": "certificate from the VM's own authority",
}


def _model_and_precision(
    env: dict[str, str], model: str, precision: str, size: str
) -> tuple[str, str, fit.Fit, bool]:
    """--model/--precision, or the same given as --env MODEL_ID/DTYPE; the service's default precision
    when not given. Returns (model, precision, the fit verdict, whether the precision is the default)."""
    given_model = env.pop("MODEL_ID", "")
    if model and given_model and model != given_model:
        raise PlanError(f"--model {model} and --env MODEL_ID={given_model} disagree: give one")
    model = cloudinit.validate_model(model or given_model)
    given_dtype = env.get("DTYPE", "")
    if precision and given_dtype and precision != given_dtype:
        raise PlanError(f"--precision {precision} and --env DTYPE={given_dtype} disagree: give one")
    precision = precision or given_dtype
    if precision and precision not in fit.BYTES_ORDER:
        raise PlanError(f"--precision {precision!r}: one of {', '.join(fit.BYTES_ORDER)}")
    chosen = not precision
    if chosen:
        precision = fit.default_precision()
    env["DTYPE"] = precision
    return model, precision, fit.check_vm(model, precision, size), chosen


def _given_token(token: str, env: dict[str, str]) -> str:
    """--token, else QWEN_BOX_ACCESS_TOKEN, else --env ACCESS_TOKEN; "" when none was given."""
    from_env = env.pop("ACCESS_TOKEN", "")
    given = token or os.environ.get(TOKEN_ENV, "") or from_env
    if given and (len(given) < 16 or not given.isprintable() or " " in given):
        raise PlanError(
            "the access token must be at least 16 printable characters without spaces "
            "(its value is not shown here)"
        )
    return given


def deploy(
    *,
    image: str,
    name: str = "",
    region: str = "eastus",
    size: str = "Standard_B2s",
    allow_from: str = "",
    public: bool = False,
    ssh: bool = False,
    port: int = 0,
    disk_gb: int = 64,
    env: Sequence[str] = (),
    registry_user: str = "",
    subscription: str = "",
    model: str = "",
    precision: str = "",
    tls: bool = True,
    trusted_cert: bool = False,
    token: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 5.0,
    dry_run: bool = False,
    console: Console | None = None,
    connect_clients: ClientFactory | None = None,
    ssh_dir: Path | None = None,
) -> int:
    """`invoke deploy-azure`: plan, (unless --dry-run) create or converge, wait for health, print the URL
    and, for a new VM, its access token (once)."""
    out = _console(console)
    if not image:
        return _fail(
            out,
            "--image is required: REGISTRY/NAME:TAG of the qwen-box image (invoke push puts it "
            "in a registry)",
            2,
        )
    try:
        settings = cloudinit.parse_env(list(env))
        given_token = _given_token(token, settings)
        model, precision, verdict, auto = _model_and_precision(settings, model, precision, size)
        if not verdict.fits:
            return _fail(out, "the model does not fit the VM: " + verdict.message, 2)
        if tls:
            settings.setdefault("PROXY_HOPS", "1")
        d = Deployment(
            name=name or default_name(),
            image=cloudinit.validate_image(image),
            region=region,
            size=size,
            port=port,
            disk_gb=disk_gb,
            public=public,
            allow_from=parse_sources(allow_from) if allow_from else (),
            ssh=ssh,
            env=settings,
            tls=tls,
            trusted_cert=trusted_cert,
            model=model,
            dns_zone=credentials.Cloud.from_env().dns_zone,
        )
        registry = _registry(image, registry_user)
        cloudinit.render(
            d.image,
            d.port,
            {**d.env, "ACCESS_TOKEN": "x" * 43},
            registry,
            caddyfile=d.caddyfile,
            model=d.model,
        )
    except (PlanError, cloudinit.CloudInitError) as exc:
        return _fail(out, str(exc), 2)
    shown_model = model or f"{fit.DEFAULT_MODEL_ID} (the image's own)"
    model_line = f"{shown_model} at {precision}" + (" (the default)" if auto else "")
    if dry_run:
        for line in plan_lines(make_plan(d)):
            out.print(line, highlight=False)
        out.print(f"\nModel: {model_line}. {verdict.message}", highlight=False)
        out.print("\n(dry run: nothing was sent to Azure)")
        return 0
    try:
        mine: tuple[str, ...] = ()
        if (not d.public and not d.allow_from) or (d.ssh and not d.allow_from):
            mine = (credentials.discover_public_ip(),)
        http_from = d.allow_from or (() if d.public else mine)
        d = d.with_sources(http_from, (d.allow_from or mine) if d.ssh else ())
        key, key_path, generated = credentials.ssh_public_key(ssh_dir)
        clients = (connect_clients or connect_default)(subscription)
        exists = azure.vm_exists(clients, d)
    except (CredentialsError, AzureActionError, cloudinit.CloudInitError, PlanError) as exc:
        return _fail(out, str(exc))
    except AzureError as exc:
        return _fail(out, explain(exc, region=d.region, size=d.size, name=d.name))
    new_token = ""
    if not exists:
        new_token = given_token or state.load_token(d.name) or secrets.token_urlsafe(32)
        state.save_token(d.name, new_token)
    access = new_token or given_token
    if access:
        d = d.with_env({**d.env, "ACCESS_TOKEN": access})
    text = cloudinit.render(d.image, d.port, d.env, registry, caddyfile=d.caddyfile, model=d.model)
    plan = make_plan(d)
    out.print(
        f"[bold]Deploying {d.name}[/] ({d.image} on {d.size} in {d.region}, "
        f"subscription {clients.subscription})"
    )
    out.print(f"  model: {model_line}. {verdict.message}", highlight=False)
    for line in plan.exposure:
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
        message = (
            str(exc)
            if isinstance(exc, AzureActionError)
            else explain(exc, region=d.region, size=d.size, name=d.name)
        )
        _fail(out, message)
        out.print(
            f"What was created so far stays: re-run deploy-azure (it converges) or "
            f"invoke destroy-azure --name {d.name}."
        )
        return 1
    if result.container_updated:
        out.print("  the container was updated to the new image/settings")
    verify: bool | str = d.cert.startswith("acme")
    health = _wait(out, result, d, timeout, interval, started, verify)
    if health.phase == "ok":
        ca = _save_ca(out, clients, d, result) if d.cert == "internal" else None
        out.print(
            f"\n[bold green]Ready:[/] {result.url}  (model {health.detail})"
            if health.detail
            else f"\n[bold green]Ready:[/] {result.url}"
        )
        _print_access(out, d, result, new_token if new_token and not given_token else "", ca)
        out.print(
            f"Status: invoke status-azure --name {d.name}    Tear down: invoke destroy-azure --name {d.name}"
        )
        return 0
    why = (
        f"the service reported an error: {health.detail}"
        if health.phase == "error"
        else f"not healthy after {int(timeout)} s (last phase: {health.label})"
    )
    out.print(f"\n[bold red]{d.url} is not ready:[/] {why}. Collecting diagnostics...")
    if health.phase == "booting" and allow_from and not d.public:
        out.print("  (the wait checks from this machine: outside --allow-from, it cannot see the VM)")
    if health.phase == "booting" and d.cert.startswith("acme"):
        out.print(
            "  (with HTTPS the VM answers once Caddy has its certificate: see `journalctl -u caddy` "
            "in the diagnostics)"
        )
    _print_diagnostics(out, clients, d)
    if new_token:
        out.print(f"The access token is saved in {state.token_file(d.name)} (readable only by you).")
    out.print(
        f"The resources are still there: re-run deploy-azure to converge, or invoke destroy-azure "
        f"--name {d.name} to remove them."
    )
    return 1


def _save_ca(out: Console, clients: AzureClients, d: Deployment, result: azure.DeployResult) -> Path | None:
    """Fetch and keep the root of the VM's own authority, and check the VM's certificate against it."""
    try:
        with out.status("fetching the VM's root certificate (run-command)"):
            pem = azure.fetch_ca_root(clients, d)
    except (AzureActionError, AzureError) as exc:
        out.print(f"[yellow]warning:[/] could not fetch the VM's root certificate: {exc}")
        return None
    path = state.save_ca(d.name, pem)
    check = azure.probe(result.ip, d.port, tls=True, server_name=result.fqdn, verify=str(path))
    if check.phase != "ok":
        out.print(
            f"[yellow]warning:[/] the VM's certificate did not check out against the root it gave "
            f"({check.label}); do not trust {path} blindly."
        )
    return path


def _print_access(
    out: Console, d: Deployment, result: azure.DeployResult, token: str, ca: Path | None
) -> None:
    """The one place a generated token is ever shown, and how to use it."""
    saved = state.token_file(d.name)
    if token:
        out.print(
            f"[bold]Access token[/] (shown this once; kept in {saved}, readable only by you):",
            highlight=False,
        )
        out.print(f"  {token}", highlight=False, markup=False, soft_wrap=True)
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


def _wait(
    out: Console,
    result: azure.DeployResult,
    d: Deployment,
    timeout: float,
    interval: float,
    started: float,
    verify: bool | str,
) -> azure.Health:
    with out.status("waiting for the service") as spinner:

        def phase(health: azure.Health) -> None:
            out.print(f"  [dim]{_clock(started)}[/] {health.label}")
            spinner.update(health.label)

        return azure.wait_healthy(
            result.ip,
            d.port,
            timeout=timeout,
            interval=interval,
            on_phase=phase,
            probe_timeout=min(5.0, max(interval, 0.5)),
            tls=d.tls,
            server_name=result.fqdn,
            verify=verify,
        )


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


def status(
    *,
    name: str = "",
    subscription: str = "",
    console: Console | None = None,
    connect_clients: ClientFactory | None = None,
) -> int:
    """`invoke status-azure`: power state, URL, exposure and health of a deployment."""
    out = _console(console)
    clients = _session(out, subscription, connect_clients)
    if clients is None:
        return 1
    try:
        names = _resolve(out, clients, name)
        if names is None:
            return 1
        ca = state.ca_file(names.name)
        st = azure.status(clients, names, ca_file=str(ca) if ca.exists() else "")
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
    table.add_row("HTTPS", CERT_SHORT.get(st.cert, st.cert) if st.cert else "off (plain HTTP)")
    saved = state.token_file(names.name)
    table.add_row("access token", f"kept in {saved}" if saved.exists() else "not kept on this machine")
    table.add_row("health", st.health.label if st.health else "not checked (VM not running)")
    out.print(table)
    return 0


def logs(
    *,
    name: str = "",
    lines: int = 100,
    subscription: str = "",
    console: Console | None = None,
    connect_clients: ClientFactory | None = None,
) -> int:
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


def destroy(
    *,
    name: str = "",
    yes: bool = False,
    subscription: str = "",
    console: Console | None = None,
    connect_clients: ClientFactory | None = None,
    confirm: Callable[[str], bool] = _ask,
) -> int:
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
        if not yes and not confirm(
            f"Delete resource group {names.group} and everything in it (VM, disk, IP, network)? [y/N] "
        ):
            out.print("Not deleted (answer y, or pass --yes).")
            return 1
        started = time.monotonic()
        with out.status(f"deleting {names.group} (takes a few minutes)"):
            azure.destroy(clients, names)
    except AzureActionError as exc:
        return _fail(out, str(exc))
    except AzureError as exc:
        return _fail(out, explain(exc, name=name))
    state.forget(names.name)
    out.print(f"Deleted {names.group} in {_clock(started)}: nothing of {names.name} is left to bill.")
    return 0
