"""Asking the VM itself: its power state, and shell scripts run as root through the VM agent (Azure's
Run Command), for the container's log, the diagnostics of a deploy that did not come up, and the root
certificate of a private VM's own authority. No SSH: the VM may well have port 22 closed.

Azure keeps only the last 4 KiB of each stream of a Run Command, so these ask for tails, not whole logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from infra.azure.credentials import AzureClients
from infra.azure.deployment import Names
from infra.azure.errors import AzureActionError, error_code, explain, explain_message
from infra.image import CONTAINER


def run_command(clients: AzureClients, names: Names, script: str) -> tuple[str, str]:
    """Run a shell script as root on the VM through the VM agent; returns (stdout, stderr).

    Azure keeps only the last 4 KiB of each stream, so callers ask for tails, not whole logs. A Run
    Command that Azure accepted but could not carry out (its operation failed: the VM agent did not
    answer, another command still runs) raises AzureActionError saying so and what to do.
    """
    poller = clients.compute.virtual_machines.begin_run_command(
        names.group, names.vm, {"commandId": "RunShellScript", "script": script.splitlines()}
    )
    try:
        result = poller.result()
    except HttpResponseError as exc:
        raise AzureActionError(_run_command_failed(names, exc)) from exc
    message = "\n".join(v.message or "" for v in (result.value or []))
    stdout, _, stderr = message.partition("[stderr]")
    stdout = stdout.split("[stdout]", 1)[-1]
    return stdout.strip("\n"), stderr.strip("\n")


def _run_command_failed(names: Names, exc: HttpResponseError) -> str:
    code, msg = error_code(exc), explain_message(exc)
    low = (code + " " + msg).lower()
    if "in progress" in low or code == "Conflict":
        step = "another Run Command is still running on the VM: wait for it to finish, then try again"
    elif "agent" in low or "not reported status" in low:
        step = (
            "the VM agent, which runs the commands, did not answer: the VM may still be booting or be out "
            f"of memory. See status-azure, wait a few minutes and try again, or restart the VM (`az vm "
            f"restart --resource-group {names.group} --name {names.vm}`)"
        )
    else:
        step = "wait a minute and try again; if it keeps failing, restart the VM (`az vm restart`)"
    return f"Run Command on {names.vm} failed ({code}): {msg}\nNothing ran on the VM; {step}."


DIAGNOSE_SCRIPT = f"""\
echo '--- cloud-init status'
cloud-init status --long 2>&1 || true
echo '--- qwen-box progress (cloud-init output, tail)'
tail -n 30 /var/log/cloud-init-output.log 2>&1 || true
echo '--- containers'
docker ps --all 2>&1 || true
echo '--- container log (tail)'
docker logs --tail 30 {CONTAINER} 2>&1 || true
"""


@dataclass(frozen=True)
class VmState:
    """What the VM's instance view says: its power state, and why its provisioning failed, if it did
    (e.g. AllocationFailed: such a VM has no power state, it never ran)."""

    power: str = "unknown"
    failure_code: str = ""
    failure_message: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.failure_code)

    @property
    def failure(self) -> str:
        return f"{self.failure_code}: {self.failure_message}" if self.failure_message else self.failure_code


def vm_state(clients: AzureClients, names: Names) -> VmState:
    """The VM's power state and provisioning failure, from one instance view."""
    view = clients.compute.virtual_machines.instance_view(names.group, names.vm)
    power, code, message = "unknown", "", ""
    for status in view.statuses or []:
        parts = (status.code or "").split("/")
        if parts[0] == "PowerState" and len(parts) > 1:
            power = parts[1]
        elif parts[0] == "ProvisioningState" and len(parts) > 1 and parts[1].lower() == "failed":
            code = parts[2] if len(parts) > 2 else "Failed"
            message = (status.message or status.display_status or "").strip()
    return VmState(power, code, message)


def power_state(clients: AzureClients, names: Names) -> str:
    """running / deallocated / stopped / starting ... from the VM's instance view."""
    return vm_state(clients, names).power


def failed_vm_advice(names: Names, state: VmState) -> str:
    """What a VM whose provisioning failed means, and the next step (deploy-azure recreates it)."""
    return (
        f"{names.vm} failed to provision ({state.failure}). It never ran, so it has no log and no "
        f"service. Re-run deploy-azure: it deletes and recreates the VM (the public IP and its address "
        "stay); if Azure has no capacity for the size (AllocationFailed), add another --size or "
        "--region."
    )


def diagnostics(clients: AzureClients, names: Names, serial_lines: int = 40) -> list[tuple[str, str]]:
    """What to show when the service did not come up: VM state, cloud-init and container state (via
    run-command), and the tail of the serial console (boot diagnostics). Each part is best effort."""
    sections: list[tuple[str, str]] = []
    try:
        state = vm_state(clients, names)
        shown = failed_vm_advice(names, state) if state.failed else state.power
        sections.append(("VM power state", shown))
    except HttpResponseError as exc:
        sections.append(("VM power state", f"unavailable: {explain(exc)}"))
    try:
        out, err = run_command(clients, names, DIAGNOSE_SCRIPT)
        text = (out + ("\n" + err if err else "")).strip()
        sections.append(("On the VM (run-command)", text or "(no output)"))
    except AzureActionError as exc:
        sections.append(("On the VM (run-command)", f"unavailable: {exc}"))
    except HttpResponseError as exc:
        sections.append(("On the VM (run-command)", f"unavailable: {explain(exc)}"))
    try:
        data = clients.compute.virtual_machines.retrieve_boot_diagnostics_data(names.group, names.vm)
        response = requests.get(data.serial_console_log_blob_uri or "", timeout=30, verify=clients.verify)
        response.raise_for_status()
        tail = "\n".join(response.text.splitlines()[-serial_lines:])
        sections.append(("Serial console (boot diagnostics, tail)", tail or "(empty)"))
    except (HttpResponseError, requests.RequestException) as exc:
        sections.append(("Serial console (boot diagnostics, tail)", f"unavailable: {exc.__class__.__name__}"))
    return sections


CADDY_ROOT_CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
PEM_BEGIN, PEM_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"


def fetch_ca_root(clients: AzureClients, names: Names) -> str:
    """The root certificate of Caddy's own authority on the VM (a private deployment's), via run-command.

    Public by nature (it is what a client checks the server against), so fetching it is harmless; the
    key stays on the VM.
    """
    try:
        out, err = run_command(clients, names, f"cat {CADDY_ROOT_CA}")
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc
    start, end = out.find(PEM_BEGIN), out.find(PEM_END)
    if start < 0 or end < start:
        raise AzureActionError(
            f"no root certificate at {CADDY_ROOT_CA} on {names.vm}: "
            f"{(err or out).strip()[-300:] or '(no output)'}"
        )
    return out[start : end + len(PEM_END)] + "\n"


def container_logs(clients: AzureClients, names: Names, lines: int = 100) -> str:
    """The container's log tail, fetched through run-command (no SSH needed)."""
    try:
        state = vm_state(clients, names)
        if state.failed:
            raise AzureActionError(failed_vm_advice(names, state))
        if state.power in ("stopped", "deallocated"):
            raise AzureActionError(
                f"{names.vm} is {state.power}, so it cannot run commands: start it (re-run "
                "deploy-azure, which starts a stopped VM) and try again"
            )
        if state.power != "running":
            raise AzureActionError(
                f"{names.vm} is {state.power}, so it cannot run commands yet: wait a minute and try "
                "again (status-azure shows its state)"
            )
        script = f"docker logs --tail {int(lines)} --timestamps {CONTAINER} 2>&1"
        out, err = run_command(clients, names, script)
    except ResourceNotFoundError as exc:
        raise AzureActionError(f"no deployment {names.name!r} (VM {names.vm} not found)") from exc
    except HttpResponseError as exc:
        raise AzureActionError(explain(exc, name=names.name)) from exc
    return (out + ("\n" + err if err else "")).strip()
