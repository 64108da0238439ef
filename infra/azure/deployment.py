"""What an Azure deployment is, decided before anything is sent: the options, their validation, the
names of the resources, and `prepare`, which turns options into everything a deploy needs.

Pure data and pure functions, no SDK and no network: `--dry-run` stops after `prepare` and prints its
plan (infra/azure/plan.py), and the request bodies (infra/azure/arm.py) are built from the same
`Deployment`, so the plan shown is the plan run. The deploy's later phases (provision, wait, report)
are in infra/azure/target.py, provision.py and cli.py.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.azure import certs, state
from infra.azure.sizes import DEFAULT_SIZE, Fit, check_vm
from infra.fit import BYTES_ORDER, default_precision
from infra.settings import parse_env
from infra.vm import cloudinit
from infra.vm.caddy import caddyfile, http_caddyfile
from service.config import DEFAULT_MODEL_ID, Settings

APP_TAG = "qwen-box"
DEFAULT_REGION = "eastus"
DEFAULT_DISK_GB = 64
DEFAULT_TIMEOUT = 1800.0  # first boot installs Docker and pulls a multi-GB image before the model loads
DEFAULT_INTERVAL = 5.0
ADMIN_USER = "azureuser"
UBUNTU_2404 = {"publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest"}
VNET_PREFIX = "10.42.0.0/16"
SUBNET_PREFIX = "10.42.0.0/24"
DB_SUBNET_PREFIX = "10.42.1.0/24"  # delegated to PostgreSQL Flexible Server (a scale set's history)
MAX_INSTANCES = 10  # a sane cap: 10 B2s are 20 vCPUs, about a new subscription's regional B-family quota
DB_ADMIN = "qwenbox"
DB_NAME = "qwenbox"
DB_PASSWORD_KEY = "database_password"
INTERNET = "Internet"
PUBLIC_DNS_ZONE = "cloudapp.azure.com"
TOKEN_ENV = "QWEN_BOX_ACCESS_TOKEN"
REGISTRY_PASSWORD_ENV = "QWEN_BOX_REGISTRY_PASSWORD"

_NAME = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
_REGION = re.compile(r"^[a-z][a-z0-9]{2,30}$")
_SIZE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{2,63}$")


class PlanError(ValueError):
    """An option that cannot make a valid deployment; the message says which and why."""


def default_name() -> str:
    """A deployment name stable for this user on this machine and unlikely to collide in Azure DNS.

    The name becomes the DNS label `NAME.REGION.cloudapp.azure.com`, which must be unique per region, so
    a bare "qwen-box" would often be taken; a short hash of user@host keeps it unique yet repeatable.
    """
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    return f"{APP_TAG}-{hashlib.sha256(who.encode()).hexdigest()[:6]}"


def parse_sources(text: str) -> tuple[str, ...]:
    """`--allow-from`: one or more comma-separated IPv4 addresses or CIDR blocks, normalised."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise PlanError(
                f"--allow-from: {part!r} is not an IP address or CIDR block (e.g. 203.0.113.7 or "
                "203.0.113.0/24)"
            ) from None
        if net.version != 4:
            raise PlanError(
                f"--allow-from {part}: an IPv6 source cannot reach the VM, whose public IP is IPv4 only "
                "(and Azure refuses a rule that mixes IPv4 and IPv6). Give your IPv4 address or block: "
                "`curl -4 https://api.ipify.org` shows it"
            )
        if net.prefixlen == 0:
            raise PlanError("--allow-from 0.0.0.0/0 means everyone: say --public instead, on purpose")
        out.append(str(net))
    if not out:
        raise PlanError("--allow-from needs at least one address or CIDR block")
    return tuple(out)


@dataclass(frozen=True)
class Names:
    """The names of everything in one deployment: a resource group per deployment, all named after it.

    status/logs/destroy need only these, so they work from any machine given the deployment's name.
    """

    name: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise PlanError(
                f"--name {self.name!r}: 3-32 characters, lower-case letters, digits and hyphens, "
                "starting with a letter (it becomes the DNS label "
                "NAME.REGION.cloudapp.azure.com)"
            )

    @property
    def group(self) -> str:
        return f"{self.name}-rg"

    @property
    def nsg(self) -> str:
        return f"{self.name}-nsg"

    @property
    def vnet(self) -> str:
        return f"{self.name}-vnet"

    @property
    def subnet(self) -> str:
        return "default"

    @property
    def public_ip(self) -> str:
        return f"{self.name}-ip"

    @property
    def nic(self) -> str:
        return f"{self.name}-nic"

    @property
    def vm(self) -> str:
        return f"{self.name}-vm"

    @property
    def os_disk(self) -> str:
        return f"{self.name}-osdisk"

    # -- a scale set's (--instances): the VMs are the scale set's, the public IP is the load balancer's
    @property
    def vmss(self) -> str:
        return f"{self.name}-vmss"

    @property
    def lb(self) -> str:
        return f"{self.name}-lb"

    @property
    def nat(self) -> str:
        return f"{self.name}-nat"

    @property
    def nat_ip(self) -> str:
        return f"{self.name}-nat-ip"

    @property
    def autoscale(self) -> str:
        return f"{self.name}-autoscale"

    @property
    def db_server(self) -> str:
        """Also a DNS name (NAME-db.postgres.database.azure.com), unique in Azure as the deployment's is."""
        return f"{self.name}-db"

    @property
    def db_subnet(self) -> str:
        return "postgres"

    @property
    def db_zone(self) -> str:
        """The private DNS zone the server's name resolves in from the virtual network."""
        return f"{self.name}.private.postgres.database.azure.com"

    @property
    def tags(self) -> dict[str, str]:
        return {"app": APP_TAG, "deployment": self.name}


@dataclass(frozen=True)
class Deployment(Names):
    """Everything that decides what gets created. Validated on construction."""

    image: str = ""
    region: str = DEFAULT_REGION
    size: str = DEFAULT_SIZE
    port: int = 0  # the chat's public port; 0 = 443 with HTTPS, 80 without
    disk_gb: int = DEFAULT_DISK_GB
    public: bool = False
    allow_from: tuple[str, ...] = ()
    ssh: bool = False
    ssh_from: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold the access token
    tls: bool = True
    trusted_cert: bool = False
    model: str = ""
    dns_zone: str = PUBLIC_DNS_ZONE
    registry: cloudinit.RegistryLogin | None = field(default=None, repr=False)  # never in custom_data
    instances: tuple[int, int] = (0, 0)  # (MIN, MAX) of a scale set; (0, 0): one VM (the default)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.instances != (0, 0):
            low, high = self.instances
            if not 1 <= low <= high <= MAX_INSTANCES:
                raise PlanError(
                    f"--instances {low}-{high}: MIN and MAX between 1 and {MAX_INSTANCES}, MIN <= MAX"
                )
            if not self.tls:
                raise PlanError(
                    "--instances with --no-tls: a scale set is served over HTTPS only (its certificate is "
                    "delivered to every instance); drop --no-tls"
                )
            if self.trusted_cert:
                raise PlanError(
                    "--trusted-cert with --instances: one name in front of many instances cannot get a "
                    "Let's Encrypt certificate per instance; give a trusted one with --tls-cert/--tls-key"
                )
        if self.port == 0:
            object.__setattr__(self, "port", 443 if self.tls else 80)
        if self.tls and self.port == 80:
            raise PlanError(
                "--port 80 is the HTTP port, which redirects to HTTPS (and answers the "
                "certificate challenge); --port sets the HTTPS port (default 443), or add "
                "--no-tls for plain HTTP on 80"
            )
        if self.trusted_cert and not self.tls:
            raise PlanError("--trusted-cert is about the HTTPS certificate: drop it, or drop --no-tls")
        if not self.image:
            raise PlanError("--image is required (REGISTRY/NAME:TAG of the qwen-box image)")
        if not _REGION.match(self.region):
            raise PlanError(
                f"--region {self.region!r} does not look like an Azure region name (e.g. eastus, westeurope)"
            )
        if not _SIZE.match(self.size):
            raise PlanError(f"--size {self.size!r} does not look like a VM size (e.g. Standard_B2s)")
        if not 1 <= self.port <= 65535 or self.port == 22:
            raise PlanError(f"--port {self.port}: must be 1-65535 and not 22")
        if not 30 <= self.disk_gb <= 1024:
            raise PlanError(f"--disk-gb {self.disk_gb}: between 30 (the Ubuntu image) and 1024")
        for source in (*self.allow_from, *self.ssh_from):
            if ":" in source:
                raise PlanError(
                    f"source {source}: IPv6, but the VM's public IP is IPv4 only (see --allow-from)"
                )

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.region}.{self.dns_zone}"

    @property
    def url(self) -> str:
        return site_url(self.fqdn, self.port, self.tls)

    @property
    def http_sources(self) -> tuple[str, ...]:
        """Who may reach the chat port."""
        return (INTERNET,) if self.public else self.allow_from

    @property
    def cert(self) -> str:
        """Where the HTTPS certificate comes from (see infra/vm/caddy.py), "" without HTTPS.

        A public authority must reach the VM from the Internet to check it answers for its name, so a
        private VM gets its certificate from Caddy's own authority unless port 80 is opened for the
        challenge (--trusted-cert) or everything is public.
        """
        if not self.tls:
            return ""
        if self.scale_set:
            return "provided"
        if self.public:
            return "acme"
        return "acme-http" if self.trusted_cert else "internal"

    @property
    def scale_set(self) -> bool:
        """Whether this is a scale set behind a load balancer (--instances), not one VM."""
        return self.instances != (0, 0)

    @property
    def redirect_sources(self) -> tuple[str, ...]:
        """Who may reach port 80 (the redirect to HTTPS and the certificate challenge)."""
        return (INTERNET,) if self.cert.startswith("acme") else self.allow_from

    @property
    def caddyfile(self) -> str:
        """The reverse proxy's config on the VM: HTTPS, or plain HTTP on the port with --no-tls (the app is
        never the public listener)."""
        body = Settings.from_env(self.env).largest_request_bytes  # the proxy lets through what the app reads
        if self.tls:
            return caddyfile(self.fqdn, self.cert, https_port=self.port, max_body=body)
        return http_caddyfile(self.port, max_body=body)

    def with_sources(self, allow_from: tuple[str, ...], ssh_from: tuple[str, ...]) -> Deployment:
        """The same deployment with the deployer's address filled in (looked up only when needed)."""
        return self._with(allow_from=allow_from, ssh_from=ssh_from)

    def with_env(self, env: Mapping[str, str]) -> Deployment:
        """The same deployment with other service settings."""
        return self._with(env=env)

    def _with(self, **changes: Any) -> Deployment:
        return dataclasses.replace(self, **changes)


def site_url(fqdn: str, port: int, tls: bool) -> str:
    """https://NAME/ (or http:// with --no-tls), with the port only when it is not the scheme's own."""
    scheme, default = ("https", 443) if tls else ("http", 80)
    return f"{scheme}://{fqdn}/" if port == default else f"{scheme}://{fqdn}:{port}/"


# -- the options of `invoke deploy-azure`, and `prepare` ---------------------------------------------


def _option(default: Any, help: str = "", *, secret: bool = False) -> Any:
    """A DeployOptions field; `help` is the flag's `invoke --help deploy-azure` text ("" = not a flag).
    A `secret` one (it may hold the access token) is left out of the repr, so no log shows it."""
    return field(default=default, metadata={"help": help}, repr=not secret)


@dataclass(frozen=True)
class DeployOptions:
    """Everything `invoke deploy-azure` was asked, as given (validation is `prepare`'s). Built once, by the
    task from its flags or by a test directly; each field's help is the flag's help text."""

    image: str = _option("", "the image to run: REGISTRY/NAME:TAG (required; push it first with invoke push)")
    name: str = _option(
        "",
        "deployment name: resource group NAME-rg, URL NAME.REGION.cloudapp.azure.com "
        "(default: qwen-box-XXXXXX, fixed for this user and machine)",
    )
    region: str = _option(DEFAULT_REGION, f"Azure region (default {DEFAULT_REGION})")
    size: str = _option(DEFAULT_SIZE, f"VM size (default {DEFAULT_SIZE}: 2 vCPU, 4 GiB)")
    allow_from: str = _option(
        "", "who may reach the chat port: IP or CIDR, comma-separated (default: your public IP)"
    )
    public: bool = _option(
        False, "open the chat port to the whole Internet (say so on purpose); Let's Encrypt certificate"
    )
    ssh: bool = _option(
        False, "open SSH (key only) from the --allow-from source or your IP (default: closed)"
    )
    port: int = _option(0, "the chat's public port (default 443 with HTTPS, 80 with --no-tls)")
    disk_gb: int = _option(DEFAULT_DISK_GB, f"OS disk size in GiB (default {DEFAULT_DISK_GB})")
    env: tuple[str, ...] = _option(
        (),
        "service setting KEY=VALUE for the container, repeatable; KEY alone: value from your environment",
        secret=True,
    )
    registry_user: str = _option(
        "", f"log in to the image's registry as this user; password or token from {REGISTRY_PASSWORD_ENV}"
    )
    subscription: str = _option(
        "", "subscription id (default: AZURE_SUBSCRIPTION_ID, else the Azure CLI's default)"
    )
    timeout: float = _option(
        DEFAULT_TIMEOUT, f"seconds to wait for the service to become healthy (default {DEFAULT_TIMEOUT:.0f})"
    )
    dry_run: bool = _option(False, "print the plan (resources, exposure, monthly cost) and change nothing")
    tls: bool = _option(True, "HTTPS through Caddy on the VM (default); --no-tls serves plain HTTP on --port")
    trusted_cert: bool = _option(
        False,
        "private deployment with a Let's Encrypt certificate: opens port 80 (challenge and redirect only, "
        "no chat) to the whole Internet (default: the VM's own authority)",
    )
    model: str = _option(
        "", "Hugging Face hub id of the model (default: the image's own); refused if it cannot fit --size"
    )
    precision: str = _option(
        "",
        f"int8, int4, bfloat16 or float32 (default: the service's, {default_precision()}); "
        "refused if it does not fit",
    )
    token: str = _option(
        "", f"access token (default: generated once and kept on this machine; or {TOKEN_ENV})", secret=True
    )
    instances: str = _option(
        "",
        f"MIN or MIN-MAX (1-{MAX_INSTANCES}): a VM scale set behind a load balancer, autoscaled on CPU, "
        "with its history in PostgreSQL (default: one VM)",
    )
    tls_cert: str = _option(
        "", "with --instances: PEM file of your certificate (chain) for the name (default: generated)"
    )
    tls_key: str = _option("", "with --instances: PEM file of --tls-cert's private key", secret=True)
    interval: float = _option(DEFAULT_INTERVAL)  # the longest pause between health checks

    @classmethod
    def flags(cls) -> dict[str, str]:
        """The task's flags and their help texts (`--allow-from` for the field allow_from)."""
        return {
            f.name.replace("_", "-"): f.metadata["help"]
            for f in dataclasses.fields(cls)
            if f.metadata["help"]
        }


@dataclass(frozen=True)
class Prepared:
    """A deployment ready to provision: validated, fit-checked, cloud-init rendered (once; it holds no
    secret: the access token a new VM gets travels in the Custom Script extension). Made by `prepare`,
    which sends nothing anywhere."""

    options: DeployOptions
    deployment: Deployment  # as a new VM gets it: env holds its ACCESS_TOKEN
    cloud_init: str = field(repr=False)  # the first-boot data of a new VM (no secret in it)
    token_given: (
        bool  # the token came from the user (--token, QWEN_BOX_ACCESS_TOKEN, --env), not this machine
    )
    fit: Fit
    precision_is_default: bool
    tls: certs.ServerCertificate | None = None  # a scale set's certificate (secret key: never shown)
    database_password: str = field(default="", repr=False)  # a scale set's PostgreSQL admin password

    @property
    def token(self) -> str:
        """The access token a new VM is created with."""
        return self.deployment.env["ACCESS_TOKEN"]

    @property
    def for_existing_vm(self) -> Deployment:
        """What an existing VM converges to. It keeps the token it has: one this machine chose is not sent
        again (another machine may have chosen another); one the user gave is, and is delivered through
        the Custom Script extension when it is not the VM's (provision.py)."""
        if self.token_given:
            return self.deployment
        return self.deployment.with_env({k: v for k, v in self.deployment.env.items() if k != "ACCESS_TOKEN"})

    @property
    def model_line(self) -> str:
        d = self.deployment
        shown_model = d.model or f"{DEFAULT_MODEL_ID} (the image's own)"
        default = " (the default)" if self.precision_is_default else ""
        return f"{shown_model} at {self.fit.precision}{default}"


def _model_and_precision(
    env: dict[str, str], model: str, precision: str, size: str
) -> tuple[str, str, Fit, bool]:
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
    if precision and precision not in BYTES_ORDER:
        raise PlanError(f"--precision {precision!r}: one of {', '.join(BYTES_ORDER)}")
    chosen = not precision
    if chosen:
        precision = default_precision()
    env["DTYPE"] = precision
    return model, precision, check_vm(model, precision, size), chosen


def parse_instances(text: str) -> tuple[int, int]:
    """`--instances MIN` or `MIN-MAX` into (MIN, MAX), refused unless 1 <= MIN <= MAX <= MAX_INSTANCES."""
    low, sep, high = text.strip().partition("-")
    try:
        pair = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise PlanError(f"--instances {text!r}: MIN or MIN-MAX, whole numbers (e.g. 2 or 2-4)") from None
    if not 1 <= pair[0] <= pair[1] <= MAX_INSTANCES:
        raise PlanError(
            f"--instances {text}: MIN and MAX between 1 and {MAX_INSTANCES}, MIN no more than MAX "
            f"(more than {MAX_INSTANCES} needs a quota and a budget this kit does not assume)"
        )
    return pair


def _scale_set_certificate(
    options: DeployOptions, fqdn: str, name: str, saved: Callable[[str], dict[str, str]]
) -> certs.ServerCertificate:
    """--tls-cert/--tls-key when given, else the one made for this deployment before, else a new one."""
    if bool(options.tls_cert) != bool(options.tls_key):
        raise PlanError("--tls-cert and --tls-key go together")
    if options.tls_cert:
        try:
            with open(options.tls_cert) as c, open(options.tls_key) as k:
                return certs.load_given(c.read(), k.read(), fqdn)
        except OSError as exc:
            raise PlanError(f"cannot read {exc.filename}: {exc.strerror}") from None
        except certs.CertificateError as exc:
            raise PlanError(str(exc)) from None
    kept = saved(name)
    if kept.get("cert") and kept.get("key") and kept.get("ca"):
        return certs.ServerCertificate(kept["cert"], kept["key"], kept["ca"], generated=True)
    return certs.generate(fqdn)


def _given_token(token: str, env: dict[str, str], environ: Mapping[str, str]) -> str:
    """--token, else QWEN_BOX_ACCESS_TOKEN, else --env ACCESS_TOKEN; "" when none was given."""
    from_env = env.pop("ACCESS_TOKEN", "")
    given = token or environ.get(TOKEN_ENV, "") or from_env
    if given and (len(given) < 16 or not given.isprintable() or " " in given):
        raise PlanError(
            "the access token must be at least 16 printable characters without spaces "
            "(its value is not shown here)"
        )
    return given


def _registry(image: str, user: str, environ: Mapping[str, str]) -> cloudinit.RegistryLogin | None:
    if not user:
        return None
    password = environ.get(REGISTRY_PASSWORD_ENV, "")
    if not password:
        raise cloudinit.CloudInitError(
            f"--registry-user given: put the registry password (or a pull "
            f"token) in the {REGISTRY_PASSWORD_ENV} environment variable"
        )
    return cloudinit.RegistryLogin(cloudinit.image_registry(image) or "docker.io", user, password)


def prepare(
    options: DeployOptions,
    *,
    dns_zone: str = PUBLIC_DNS_ZONE,
    environ: Mapping[str, str] | None = None,
    saved_token: Callable[[str], str] = state.load_token,
    saved_tls: Callable[[str], dict[str, str]] = state.load_tls,
    saved_secret: Callable[[str, str], str] = state.load_secret,
) -> Prepared:
    """Validate `options`, check the model fits the size, and render the VM's cloud-init once.

    Sends nothing anywhere (it reads `environ`, os.environ by default, and this machine's saved token);
    raises PlanError, SettingsError or CloudInitError with a sentence for the user. The access token a new
    VM gets is the one given, else the one this machine kept for the name, else a new one (kept only once
    provisioning creates the VM). The deployer's own address, needed only without --allow-from, is
    looked up later (`with_my_address`), so a dry run needs no network.
    """
    environ = dict(os.environ) if environ is None else environ
    if not options.image:
        raise PlanError(
            "--image is required: REGISTRY/NAME:TAG of the qwen-box image (invoke push puts it in a registry)"
        )
    instances = parse_instances(options.instances) if options.instances else (0, 0)
    if (options.tls_cert or options.tls_key) and not options.instances:
        raise PlanError("--tls-cert/--tls-key are for a scale set (--instances); one VM gets its own")
    settings = parse_env(options.env, environ)
    given_token = _given_token(options.token, settings, environ)
    model, _, verdict, auto = _model_and_precision(settings, options.model, options.precision, options.size)
    if not verdict.fits:
        raise PlanError("the model does not fit the VM: " + verdict.message)
    settings.setdefault("PROXY_HOPS", "1")  # Caddy is in front in every mode
    registry = _registry(options.image, options.registry_user, environ)
    names = Names(options.name or default_name())
    token = given_token or saved_token(names.name) or secrets.token_urlsafe(32)
    d = Deployment(
        name=names.name,
        image=cloudinit.validate_image(options.image),
        region=options.region,
        size=options.size,
        port=options.port,
        disk_gb=options.disk_gb,
        public=options.public,
        allow_from=parse_sources(options.allow_from) if options.allow_from else (),
        ssh=options.ssh,
        env={**settings, "ACCESS_TOKEN": token},
        tls=options.tls,
        trusted_cert=options.trusted_cert,
        model=model,
        dns_zone=dns_zone,
        registry=registry,
        instances=instances,
    )
    if "ALLOWED_HOSTS" not in settings:  # the service answers only to its own name (no DNS rebinding)
        d = dataclasses.replace(d, env={**d.env, "ALLOWED_HOSTS": d.fqdn})
    text = cloudinit.render(d.image, d.port, d.env, caddyfile=d.caddyfile, model=d.model)
    if not d.scale_set:
        return Prepared(options, d, text, bool(given_token), verdict, auto)
    tls = _scale_set_certificate(options, d.fqdn, d.name, saved_tls)
    password = saved_secret(d.name, DB_PASSWORD_KEY) or secrets.token_urlsafe(24)
    return Prepared(options, d, text, bool(given_token), verdict, auto, tls, password)


def needs_my_address(d: Deployment) -> bool:
    """Whether the deployer's public address must be looked up: a private chat port, or SSH, with no
    --allow-from to say who else."""
    return not d.allow_from and (not d.public or d.ssh)


def with_my_address(prepared: Prepared, lookup: Callable[[], str]) -> Prepared:
    """The prepared deployment with the deployer's address as the source, when it needs one (`lookup`
    asks an outside service, so it is called only then). Cloud-init does not depend on the sources."""
    d = prepared.deployment
    if not needs_my_address(d):
        return prepared
    mine = (lookup(),)
    http_from = d.allow_from or (() if d.public else mine)
    ssh_from = (d.allow_from or mine) if d.ssh else ()
    return dataclasses.replace(prepared, deployment=d.with_sources(http_from, ssh_from))
