"""Where a deployment runs, behind one small interface: the CLI's deploy, status, logs and destroy
talk to a `Target`, never to the VM's specifics.

The default target is one VM (`SingleVm`): one public IP, one container, its health polled at that IP.
The scale-set target (`infra.azure.scaleset.ScaleSet`: VMs behind a load balancer, `--instances`)
sits beside it and implements the same methods, leaving infra/azure/cli.py and the deploy phases as
they are (the shape of SkyPilot's provisioners: provision, wait until ready, status, teardown).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from azure.core.exceptions import HttpResponseError

from infra import health
from infra.azure import provision, remote
from infra.azure.credentials import AzureClients
from infra.azure.deployment import Names, Prepared
from infra.azure.errors import AzureActionError, explain
from infra.azure.provision import DeployResult, Progress, Status
from infra.health import Health


class Target(Protocol):
    """One kind of place a deployment runs."""

    def provision(self, prepared: Prepared, ssh_key: str, progress: Progress) -> DeployResult:
        """Create or converge every resource (safe to re-run)."""
        ...

    def wait_ready(
        self,
        prepared: Prepared,
        result: DeployResult,
        on_phase: Callable[[Health], None],
        on_poll: Callable[[Health, float], None],
    ) -> Health:
        """Wait until the service answers ok (or fails, or the options' timeout passes, or the VM is not
        running); the last answer. `on_phase` hears each new phase, `on_poll` each look with the
        seconds since the start."""
        ...

    def status(self, names: Names, ca_file: str = "") -> Status | None:
        """The deployment as found (None: there is none); `ca_file` checks a private one's certificate."""
        ...

    def destroy(self, names: Names, progress: Progress) -> bool:
        """Delete everything of the deployment; False when there was nothing."""
        ...

    def logs(self, names: Names, lines: int, instance: str = "") -> str:
        """The container's log tail (of a scale set's `instance`: its number or name; "" the first)."""
        ...

    def diagnostics(self, names: Names) -> list[tuple[str, str]]:
        """(title, text) sections that say why a deploy did not come up."""
        ...

    def root_certificate(self, names: Names) -> str:
        """The PEM root of a private deployment's own certificate authority."""
        ...


class SingleVm:
    """One VM with a public IP, its container behind Caddy (or published as is with --no-tls)."""

    power_check_every = 30.0  # seconds between asking Azure, during the health wait, whether the VM runs

    def __init__(self, clients: AzureClients):
        self.clients = clients

    def provision(self, prepared: Prepared, ssh_key: str, progress: Progress) -> DeployResult:
        return provision.provision(self.clients, prepared, ssh_key, progress)

    def wait_ready(
        self,
        prepared: Prepared,
        result: DeployResult,
        on_phase: Callable[[Health], None],
        on_poll: Callable[[Health, float], None],
    ) -> Health:
        """Poll the VM's IP; with HTTPS, as its DNS name, checking the certificate when it is publicly
        trusted (a private VM's own authority is not known yet: its root is fetched once it is ready).

        Every `power_check_every` seconds Azure is asked whether the VM still runs: a VM that was
        stopped, deallocated or failed will not answer however long one waits, so that ends the wait.
        """
        d, options = prepared.deployment, prepared.options
        last_check = [-self.power_check_every]

        def vm_gone() -> str:
            now = time.monotonic()
            if now - last_check[0] < self.power_check_every:
                return ""
            last_check[0] = now
            try:
                state = remote.vm_state(self.clients, d)
            except HttpResponseError:
                return ""
            if state.failed:
                return remote.failed_vm_advice(d, state)
            if state.power in ("stopped", "stopping", "deallocated", "deallocating"):
                return (
                    f"{d.vm} is {state.power} (not running), so it cannot answer: re-run deploy-azure, "
                    "which starts it"
                )
            return ""

        return health.wait_healthy(
            result.ip,
            d.port,
            timeout=options.timeout,
            interval=options.interval,
            on_phase=on_phase,
            on_poll=on_poll,
            stop_if=vm_gone,
            probe_timeout=min(5.0, max(options.interval, 0.5)),
            tls=d.tls,
            server_name=result.fqdn,
            verify=d.cert.startswith("acme"),
        )

    def status(self, names: Names, ca_file: str = "") -> Status | None:
        return provision.status(self.clients, names, ca_file=ca_file)

    def destroy(self, names: Names, progress: Progress) -> bool:
        return provision.destroy(self.clients, names, progress)

    def logs(self, names: Names, lines: int, instance: str = "") -> str:
        if instance:
            raise AzureActionError(f"--instance {instance}: {names.name} is one VM, not a scale set")
        try:
            group = provision.owned_group(self.clients, names)
        except HttpResponseError as exc:
            raise AzureActionError(explain(exc, name=names.name)) from exc
        if group is None:
            raise AzureActionError(f"no deployment {names.name!r} (resource group {names.group} not found)")
        return remote.container_logs(self.clients, names, lines)

    def diagnostics(self, names: Names) -> list[tuple[str, str]]:
        return remote.diagnostics(self.clients, names)

    def root_certificate(self, names: Names) -> str:
        return remote.fetch_ca_root(self.clients, names)
