"""A fake Azure Resource Manager on loopback, for driving the real Azure SDK clients in tests.

No package emulates ARM compute and network, so this speaks the REST protocol the SDKs speak: HTTPS
(a throw-away `trustme` CA), bearer tokens, `api-version` on every call, ARM error bodies, and long-running
operations (201/202 + `Azure-AsyncOperation`/`Location`, polled until `Succeeded`). It keeps state, so a
test asserts what a deployment actually created rather than what a mock was told. It also behaves like
Azure where our code could go wrong: references between resources must exist, `customData` is
write-only and immutable, a resource group delete takes everything in it, a VM delete takes the NIC
and disk marked deleteOption Delete, the OS disk is created untagged, a mixed IPv4/IPv6 rule is refused,
and faults (409, 429 with `Retry-After`, 5xx, quota, an operation that fails) can be injected per
request; a PUT whose operation failed leaves the resource in provisioningState Failed (a VM's instance
view then says why). For a scale set it also keeps a Flexible VM scale set (its instances are VMs of
their own, as many as its capacity, whose instance view carries the health extension's verdict), a
load balancer, a NAT gateway, an autoscale setting (not long-running, as in ARM), a PostgreSQL flexible
server (PUT answered 202 without a body, password write-only, the delegated subnet checked) with its
databases and settings, and a private DNS zone with its network links. It also answers
azure-identity's client-secret sign-in as Microsoft Entra ID does (OpenID configuration, token
endpoint, AADSTS7000215 for a wrong secret).
"""

from __future__ import annotations

import itertools
import json
import re
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trustme

API_VERSIONS = {
    "resourcegroups": {"2025-04-01"},
    "microsoft.network": {"2026-03-01"},
    "microsoft.network/privatednszones": {"2024-06-01"},
    "microsoft.insights": {"2022-10-01"},
    "microsoft.dbforpostgresql": {"2026-10-01"},
    "microsoft.compute": {"2026-04-01", "2026-03-03", "2026-03-02"},
    "microsoft.compute/skus": {"2021-07-01"},
    "microsoft.compute/locations/usages": {"2026-04-01"},
}

# Child resources this fake keeps (provider type, child collection), beside VM extensions.
NESTED = {
    ("microsoft.network/privatednszones", "virtualnetworklinks"),
    ("microsoft.dbforpostgresql/flexibleservers", "databases"),
    ("microsoft.dbforpostgresql/flexibleservers", "configurations"),
}

# The VM sizes the fake's regions offer: name -> (family, vCPUs), as Azure's SKU list and usages name them.
SKU_INFO = {
    "Standard_B2s": ("standardBSFamily", 2),
    "Standard_B2ms": ("standardBSFamily", 2),
    "Standard_B2as_v2": ("standardBasv2Family", 2),
    "Standard_D2s_v5": ("standardDSv5Family", 2),
    "Standard_D2as_v5": ("standardDASv5Family", 2),
    "Standard_B4ms": ("standardBSFamily", 4),
    "Standard_D4s_v5": ("standardDSv5Family", 4),
    "Standard_D4as_v5": ("standardDASv5Family", 4),
}
SKUS = list(SKU_INFO)
# Usage names and their localized values, as ARM gives them (the region's total is "cores").
FAMILY_LABELS = {
    "standardBSFamily": "Standard BS Family vCPUs",
    "standardBasv2Family": "Standard Basv2 Family vCPUs",
    "standardDSv5Family": "Standard DSv5 Family vCPUs",
    "standardDASv5Family": "Standard DASv5 Family vCPUs",
}
DEFAULT_FAMILY_LIMIT = 100
DEFAULT_REGIONAL_LIMIT = 350


@dataclass
class Fault:
    """Answer the next `times` requests matching `method` and `path` (a regex) with an error.

    With `lro=True` the request is accepted and its long-running operation ends in that error instead,
    the way Azure reports allocation and many quota failures.
    """

    method: str
    path: str
    status: int
    code: str
    message: str
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    lro: bool = False


@dataclass
class Operation:
    polls_left: int
    on_done: Callable[[], None] | None = None
    on_error: Callable[[], None] | None = None
    error: dict | None = None
    result: dict | None = None
    done: bool = False


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _key(*parts: str) -> str:
    return "/".join(p.lower() for p in parts)


def succeeding_vm(script: str) -> str:
    """What a VM on which every command works prints for a run-command script: its plain echo lines."""
    return "\n".join(m.group(1) for m in re.finditer(r'^echo "([^"$]*)"$', script, flags=re.M))


class FakeArm:
    """The fake ARM. `start()` it, point clients at `url` with `ca_path` as the CA bundle, `stop()` it."""

    def __init__(
        self,
        subscription: str = "00000000-0000-0000-0000-000000000001",
        public_ip: str = "127.0.0.1",
        polls: int = 1,
    ):
        self.subscription = subscription
        self.public_ip = public_ip
        self.polls = polls
        self.groups: dict[str, dict] = {}
        self.resources: dict[str, dict] = {}
        self.secrets: dict[str, dict] = {}
        self.extensions: dict[str, dict] = {}
        self.bodies: list[tuple[str, str, dict | None]] = []
        self.operations: dict[str, Operation] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []
        self.run_commands: list[str] = []
        self.restricted: dict[str, dict[str, str]] = {}  # size -> region -> the restriction's reasonCode
        # vCPU quota knobs: family (e.g. "standardBSFamily") or the region's total -> (vCPUs in use by
        # others, limit). The usages ARM reports add the vCPUs of the VMs this fake holds (a scale set's
        # instances too), as Azure counts a deployment's own VMs, allocated or not.
        self.quota: dict[str, tuple[int, int]] = {}
        self.regional_cores: tuple[int, int] = (0, DEFAULT_REGIONAL_LIMIT)
        self.power_state = "running"
        self.instance_health: dict[str, str] = {}  # a scale set instance's name -> healthy/unhealthy/...
        self.lagging_instances = 0  # a scale set's instances a model change has not reached yet
        self.public_instances = False  # whether a scale set was ever given a public IP per instance
        self.vm_failures: dict[str, dict[str, str]] = {}  # VM key -> the error its creation ended in
        self.serial_log = "[    0.000000] Linux version 6.8.0-azure\ncloud-init: qwen-box: pulling image\n"
        self.vm_shell: Callable[[str], str] = succeeding_vm
        self.client_secret = "the-right-secret"  # what the fake sign-in endpoint accepts
        self.lock = threading.RLock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._ca = trustme.CA()
        self.url = ""
        self.ca_path = ""

    def start(self, workdir: Path) -> FakeArm:
        ca_path = workdir / "fake-arm-ca.pem"
        self._ca.cert_pem.write_to_path(str(ca_path))
        self.ca_path = str(ca_path)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        fake = self

        class Handler(_Handler):
            arm = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-arm", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # -- what tests look at and set up ---------------------------------------------------------
    def fail(
        self,
        method: str,
        path: str,
        status: int,
        code: str = "",
        message: str = "",
        times: int = 1,
        headers: dict[str, str] | None = None,
        lro: bool = False,
    ) -> None:
        with self.lock:
            self.faults.append(Fault(method.upper(), path, status, code, message, times, headers or {}, lro))

    def restrict_sku(self, size: str, region: str, reason: str = "NotAvailableForSubscription") -> None:
        self.restricted.setdefault(size.lower(), {})[region.lower()] = reason

    def resource(self, group: str, provider_type: str, name: str) -> dict:
        with self.lock:
            return self.resources[_key(group, provider_type, name)]

    def resource_ids(self) -> list[str]:
        with self.lock:
            return sorted(r["id"] for r in self.resources.values())

    def custom_data(self, group: str, vm: str) -> str:
        """What the VM was created with: write-only in Azure, so only the fake's own state has it."""
        with self.lock:
            return self.secrets[_key(group, vm)]["customData"]

    def count(self, method: str, pattern: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p, re.I))

    def is_empty(self) -> bool:
        with self.lock:
            return not self.groups and not self.resources

    # -- sign-in (Microsoft Entra ID's OpenID configuration and token endpoint, for azure-identity) --
    def sign_in(self, method: str, path: str, raw: bytes) -> tuple[int, dict, dict[str, str]] | None:
        """Answer azure-identity's ClientSecretCredential (authority = this fake's url) as Entra does:
        the tenant's OpenID configuration, then a token for the right secret or AADSTS7000215."""
        match = re.fullmatch(r"/([^/]+)/(v2\.0/\.well-known/openid-configuration|oauth2/v2\.0/token)", path)
        if not match:
            return None
        tenant, what = match.groups()
        with self.lock:
            self.requests.append((method, path, ""))
        base = f"{self.url}/{tenant}"
        if what.startswith("v2.0"):
            return (
                200,
                {
                    "issuer": f"{base}/v2.0",
                    "token_endpoint": f"{base}/oauth2/v2.0/token",
                    "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                    "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                },
                {},
            )
        form = parse_qs(raw.decode())
        if form.get("client_secret", [""])[0] != self.client_secret:
            return (
                401,
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the "
                    "secret being sent in the request is the client secret value, not the client secret "
                    f"ID, for a secret added to app '{form.get('client_id', ['?'])[0]}'. Trace ID: "
                    f"{uuid.uuid4()} Correlation ID: {uuid.uuid4()} Timestamp: 2026-12-01 09:00:00Z",
                    "error_codes": [7000215],
                },
                {},
            )
        return 200, {"token_type": "Bearer", "expires_in": 3600, "access_token": "fake-entra-token"}, {}

    # -- request handling ----------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query: dict[str, str], body: dict | None, headers: dict[str, str]
    ) -> tuple[int, dict | None, dict[str, str]]:
        with self.lock:
            self.requests.append((method, path, query.get("api-version", "")))
            self.bodies.append((method, path, json.loads(json.dumps(body))))
            if path.startswith("/fake/"):
                return self._fake_endpoint(method, path)
            if not headers.get("authorization", "").startswith("Bearer "):
                raise ArmError(
                    401,
                    "AuthenticationFailed",
                    "Authentication failed. The 'Authorization' header is missing.",
                )
            self._check_api_version(path, query.get("api-version"))
            fault = self._take_fault(method, path)
            if fault and not fault.lro:
                raise ArmError(fault.status, fault.code, fault.message, fault.headers)
            status, payload, extra = self._route(method, path, query, body)
            if fault and fault.lro:
                op_id = extra.get("Azure-AsyncOperation", "").rsplit("/", 1)[-1]
                if op_id in self.operations:
                    error = {"code": fault.code, "message": fault.message}
                    self.operations[op_id].on_done = None
                    self.operations[op_id].error = error
                    stored = payload if isinstance(payload, dict) else self._stored(path)
                    if method == "PUT" and isinstance(stored, dict) and "properties" in stored:
                        self.operations[op_id].on_error = lambda: self._failed(stored, error)
            return status, payload, extra

    def _stored(self, path: str) -> dict | None:
        """The resource a path names, for a PUT answered without a body (202)."""
        parts = [p for p in path.split("/") if p]
        if len(parts) == 8:
            return self.resources.get(_key(parts[3], parts[5] + "/" + parts[6], parts[7]))
        if len(parts) == 10:
            return self.resources.get(_key(parts[3], parts[5] + "/" + parts[6], parts[7], parts[8], parts[9]))
        return None

    def _failed(self, resource: dict, error: dict[str, str]) -> None:
        """A PUT whose operation failed leaves the resource there in provisioningState Failed, and a VM's
        instance view says why (as Azure does after, e.g., AllocationFailed)."""
        resource["properties"]["provisioningState"] = "Failed"
        if resource["type"].lower() == "microsoft.dbforpostgresql/flexibleservers":
            resource["properties"]["state"] = "Disabled"
        if resource["type"].lower() == "microsoft.compute/virtualmachines":
            group = resource["id"].split("/")[4]
            self.vm_failures[_key(group, resource["type"], resource["name"])] = error

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and re.search(fault.path, path, re.I):
                fault.times -= 1
                return fault
        return None

    def _check_api_version(self, path: str, version: str | None) -> None:
        low = path.lower()
        if "/providers/microsoft.compute/skus" in low:
            family = "microsoft.compute/skus"
        elif re.search(r"/providers/microsoft\.compute/locations/[^/]+/usages$", low):
            family = "microsoft.compute/locations/usages"
        elif "/providers/microsoft.network/privatednszones/" in low:
            family = "microsoft.network/privatednszones"
        elif "/providers/microsoft.network/" in low:
            family = "microsoft.network"
        elif "/providers/microsoft.insights/" in low:
            family = "microsoft.insights"
        elif "/providers/microsoft.dbforpostgresql/" in low:
            family = "microsoft.dbforpostgresql"
        elif "/providers/microsoft.compute/" in low:
            family = "microsoft.compute"
        else:
            family = "resourcegroups"
        if not version:
            raise ArmError(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        if version not in API_VERSIONS[family]:
            raise ArmError(400, "InvalidApiVersionParameter", f"The api-version '{version}' is invalid.")

    def _route(self, method, path, query, body):
        parts = [p for p in path.split("/") if p]
        low = [p.lower() for p in parts]
        if len(low) < 2 or low[0] != "subscriptions":
            raise ArmError(404, "NotFound", f"No route for {path}")
        if parts[1] != self.subscription:
            raise ArmError(404, "SubscriptionNotFound", f"The subscription '{parts[1]}' could not be found.")
        rest, lrest = parts[2:], low[2:]
        if lrest == ["providers", "microsoft.compute", "skus"]:
            return 200, {"value": self._skus(query.get("$filter", ""))}, {}
        if (
            len(lrest) == 5
            and lrest[:3] == ["providers", "microsoft.compute", "locations"]
            and lrest[4] == "usages"
        ):
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", method)
            return 200, {"value": self._usages(lrest[3])}, {}
        if lrest == ["resourcegroups"] and method == "GET":
            return 200, {"value": self._list_groups(query.get("$filter", ""))}, {}
        if len(lrest) == 2 and lrest[0] == "resourcegroups":
            return self._group(method, rest[1], body)
        if len(lrest) == 5 and lrest[0] == "resourcegroups" and lrest[2] == "providers" and method == "GET":
            return 200, {"value": self._list(rest[1], rest[3] + "/" + rest[4], query.get("$filter", ""))}, {}
        if len(lrest) >= 6 and lrest[0] == "resourcegroups" and lrest[2] == "providers":
            group = rest[1]
            if _key(group) not in self.groups:
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{group}' could not be found.")
            ptype = "/".join(lrest[3:5])
            name = rest[5]
            tail = lrest[6:]
            if ptype == "microsoft.compute/virtualmachines" and len(tail) == 2 and tail[0] == "extensions":
                return self._extension(method, group, name, rest[7], body)
            if ptype == "microsoft.compute/virtualmachines" and tail:
                return self._vm_action(method, group, name, tail, body)
            if len(tail) == 2 and (ptype, tail[0]) in NESTED:
                return self._nested(method, group, rest[3] + "/" + rest[4], name, rest[6], rest[7], body)
            if tail:
                raise ArmError(404, "NotFound", f"No route for {path}")
            return self._resource(method, path, group, rest[3] + "/" + rest[4], name, body)
        raise ArmError(404, "NotFound", f"No route for {path}")

    # -- resource groups -----------------------------------------------------------------------
    def _group_body(self, name: str) -> dict:
        return self.groups[_key(name)]

    def _group(self, method, name, body):
        key = _key(name)
        group = self.groups.get(key)
        if method == "HEAD":
            return (204 if group else 404), None, {}
        if method == "GET":
            if not group:
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
            return 200, group, {}
        if method == "PUT":
            if group and group["properties"]["provisioningState"] == "Deleting":
                raise ArmError(
                    409,
                    "ResourceGroupBeingDeleted",
                    f"The resource group '{name}' is in deprovisioning state and cannot perform "
                    "this operation.",
                )
            if not body or "location" not in body:
                raise ArmError(
                    400, "LocationRequired", "The location property is required for this definition."
                )
            if group and group["location"] != body["location"].lower():
                raise ArmError(
                    409,
                    "InvalidResourceGroupLocation",
                    f"Invalid resource group location '{body['location']}'. The Resource group "
                    f"already exists in location '{group['location']}'.",
                )
            self.groups[key] = {
                "id": f"/subscriptions/{self.subscription}/resourceGroups/{name}",
                "name": name,
                "type": "Microsoft.Resources/resourceGroups",
                "location": body["location"].lower(),
                "tags": body.get("tags", {}),
                "properties": {"provisioningState": "Succeeded"},
            }
            return (200 if group else 201), self.groups[key], {}
        if method == "DELETE":
            if not group:
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")
            group["properties"]["provisioningState"] = "Deleting"

            def gone():
                self.groups.pop(key, None)
                for rkey in [k for k in self.resources if k.startswith(key + "/")]:
                    del self.resources[rkey]
                for skey in [k for k in self.secrets if k.startswith(key + "/")]:
                    del self.secrets[skey]

            op = self._operation(gone)
            return 202, None, {"Location": f"{self.url}/fake/locations/{op}", "Retry-After": "0"}
        raise ArmError(405, "MethodNotAllowed", method)

    def _list_groups(self, filt: str) -> list[dict]:
        match = re.search(r"tagName eq '([^']*)' and tagValue eq '([^']*)'", filt)
        groups = list(self.groups.values())
        if match:
            name, value = match.groups()
            groups = [g for g in groups if g.get("tags", {}).get(name) == value]
        return groups

    # -- resources -------------------------------------------------------------------------------
    def _resource(self, method, path, group, ptype, name, body):
        key = _key(group, ptype, name)
        existing = self.resources.get(key)
        rid = f"/subscriptions/{self.subscription}/resourceGroups/{group}/providers/{ptype}/{name}"
        if method == "GET":
            if not existing:
                raise ArmError(
                    404,
                    "ResourceNotFound",
                    f"The Resource '{ptype}/{name}' under resource group '{group}' was not found.",
                )
            return 200, existing, {}
        if method == "DELETE":
            if not existing:
                return 204, None, {}
            if ptype.lower() == "microsoft.compute/virtualmachines":
                op = self._operation(lambda: self._delete_vm(group, name, existing))
            elif ptype.lower() == "microsoft.compute/virtualmachinescalesets":

                def gone() -> None:
                    existing["sku"]["capacity"] = 0
                    self._reconcile_instances(group, existing)
                    self.resources.pop(key, None)

                op = self._operation(gone)
            else:
                op = self._operation(lambda: self.resources.pop(key, None))
            return 202, None, self._lro_headers(op)
        if method == "PATCH" and ptype.lower() == "microsoft.compute/disks":
            return self._patch_disk(existing, ptype, name, group, body)
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", method)
        if not isinstance(body, dict) or "location" not in body:
            raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
        resource = json.loads(json.dumps(body))
        resource.update(
            {
                "id": rid,
                "name": name,
                "type": ptype,
                "location": body["location"].lower(),
                "etag": f'W/"{uuid.uuid4()}"',
            }
        )
        props = resource.setdefault("properties", {})
        kind = ptype.lower()
        if kind == "microsoft.network/networksecuritygroups":
            self._nsg(resource)
        elif kind == "microsoft.network/virtualnetworks":
            for subnet in props.get("subnets", []):
                subnet["id"] = f"{rid}/subnets/{subnet['name']}"
                subnet.setdefault("properties", {})["provisioningState"] = "Succeeded"
        elif kind == "microsoft.network/publicipaddresses":
            self._public_ip(resource, existing)
        elif kind == "microsoft.network/networkinterfaces":
            self._nic(resource)
        elif kind == "microsoft.compute/virtualmachines":
            self._vm(group, name, resource, existing)
            self.vm_failures.pop(key, None)
        elif kind == "microsoft.network/natgateways":
            for ip in props.get("publicIpAddresses", []):
                self._require(ip.get("id"), "the NAT gateway")
        elif kind == "microsoft.network/loadbalancers":
            self._load_balancer(resource)
        elif kind == "microsoft.compute/virtualmachinescalesets":
            old = (existing or {}).get("sku", {})
            self._enforce_quota(
                resource["location"],
                resource.get("sku", {}).get("name", ""),
                int(resource.get("sku", {}).get("capacity", 0)),
                old.get("name", ""),
                int(old.get("capacity", 0)),
            )
            self._scale_set(group, name, resource)
        elif kind == "microsoft.dbforpostgresql/flexibleservers":
            self._postgres(group, name, resource, existing)
        elif kind == "microsoft.insights/autoscalesettings":
            return self._autoscale(key, resource, existing)
        props["provisioningState"] = "Updating" if existing else "Creating"
        self.resources[key] = resource

        def done():
            resource["properties"]["provisioningState"] = "Succeeded"
            if kind == "microsoft.compute/virtualmachinescalesets":
                self._reconcile_instances(group, resource)
            if kind == "microsoft.dbforpostgresql/flexibleservers":
                resource["properties"]["state"] = "Ready"

        op = self._operation(done)
        if kind.startswith("microsoft.dbforpostgresql/"):
            return 202, None, self._lro_headers(op)  # this API accepts a PUT with 202 and no body
        return (200 if existing else 201), resource, self._lro_headers(op)

    # -- a scale set's resources (tests/test_azure_scaleset.py) -----------------------------------------
    def _list(self, group: str, ptype: str, filt: str) -> list[dict]:
        """A collection GET (e.g. the group's VMs, which for a Flexible scale set are its instances)."""
        if _key(group) not in self.groups:
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{group}' could not be found.")
        prefix = _key(group, ptype) + "/"
        found = [
            r for k, r in self.resources.items() if k.startswith(prefix) and k.count("/") == prefix.count("/")
        ]
        match = re.search(r"'virtualMachineScaleSet/id' eq '([^']*)'", filt)
        if match:
            owner = match.group(1).lower()
            found = [
                r
                for r in found
                if r["properties"].get("virtualMachineScaleSet", {}).get("id", "").lower() == owner
            ]
        return sorted(found, key=lambda r: r["name"])

    def _children(self, resource: dict, *collections: str) -> None:
        for collection in collections:
            for child in resource["properties"].get(collection, []):
                child["id"] = f"{resource['id']}/{collection}/{child['name']}"

    def _load_balancer(self, resource: dict) -> None:
        """Its parts get ids, and every reference among them (and to the public IP) must resolve."""
        props = resource["properties"]
        if resource.get("sku", {}).get("name") != "Standard":
            raise ArmError(400, "InvalidParameter", "Only the Standard load balancer SKU is supported here.")
        self._children(
            resource, "frontendIPConfigurations", "backendAddressPools", "probes", "loadBalancingRules"
        )
        for front in props.get("frontendIPConfigurations", []):
            self._require(
                front.get("properties", {}).get("publicIPAddress", {}).get("id"), "the load balancer"
            )
        own = {
            c["id"].lower()
            for k in ("frontendIPConfigurations", "backendAddressPools", "probes")
            for c in props.get(k, [])
        }
        for rule in props.get("loadBalancingRules", []):
            for ref in ("frontendIPConfiguration", "backendAddressPool", "probe"):
                rid = rule.get("properties", {}).get(ref, {}).get("id", "")
                if rid and rid.lower() not in own:
                    raise ArmError(
                        400, "InvalidResourceReference", f"{ref} {rid} of rule {rule['name']} not found."
                    )

    def _scale_set(self, group: str, name: str, resource: dict) -> None:
        """Flexible orchestration only, networkApiVersion required, references resolved; customData and
        the extensions' protectedSettings kept apart and never returned, as Azure does (unlike one VM's,
        a scale set's customData may change: it applies to the instances made afterwards)."""
        props = resource["properties"]
        if props.get("orchestrationMode") != "Flexible":
            raise ArmError(400, "InvalidParameter", "This fake knows Flexible orchestration only.")
        profile = props.get("virtualMachineProfile", {})
        network = profile.get("networkProfile", {})
        if not network.get("networkApiVersion"):
            raise ArmError(
                400,
                "VmssFlexRequiresNetworkApiVersion",
                "networkApiVersion is required for Virtual Machine Scale Sets with Flexible orchestration.",
            )
        for nic in network.get("networkInterfaceConfigurations", []):
            nprops = nic.get("properties", {})
            self._require(nprops.get("networkSecurityGroup", {}).get("id"), "the scale set")
            for conf in nprops.get("ipConfigurations", []):
                cprops = conf.get("properties", {})
                if "publicIPAddressConfiguration" in cprops:
                    self.public_instances = True
                self._require(cprops.get("subnet", {}).get("id"), "the scale set")
                for pool in cprops.get("loadBalancerBackendAddressPools", []):
                    self._require(pool.get("id"), "the scale set")
        skey = _key(group, name)
        self.secrets[skey] = {"customData": profile.get("osProfile", {}).pop("customData", "")}
        for ext in profile.get("extensionProfile", {}).get("extensions", []):
            eprops = ext.get("properties", {})
            self.secrets[_key(group, name, "extensions", ext["name"])] = {
                "protectedSettings": eprops.pop("protectedSettings", None)
            }
        props["uniqueId"] = props.get("uniqueId") or str(uuid.uuid4())

    def _reconcile_instances(self, group: str, vmss: dict) -> None:
        """A Flexible scale set's instances are VMs of their own, named NAME_xxxxxxxx, as many as its
        capacity (autoscale or a PUT changes it)."""
        capacity = int(vmss.get("sku", {}).get("capacity", 0))
        mine = [
            r
            for r in self._list(group, "Microsoft.Compute/virtualMachines", "")
            if r["properties"].get("virtualMachineScaleSet", {}).get("id", "").lower() == vmss["id"].lower()
        ]
        for extra in mine[capacity:]:
            self.resources.pop(_key(group, "Microsoft.Compute/virtualMachines", extra["name"]), None)
        for _ in range(capacity - len(mine)):
            name = f"{vmss['name']}_{uuid.uuid4().hex[:8]}"
            rid = (
                f"/subscriptions/{self.subscription}/resourceGroups/{group}/providers/"
                f"Microsoft.Compute/virtualMachines/{name}"
            )
            self.resources[_key(group, "Microsoft.Compute/virtualMachines", name)] = {
                "id": rid,
                "name": name,
                "type": "Microsoft.Compute/virtualMachines",
                "location": vmss["location"],
                "properties": {
                    "virtualMachineScaleSet": {"id": vmss["id"]},
                    "hardwareProfile": {"vmSize": vmss["sku"]["name"]},
                    "provisioningState": "Succeeded",
                    "vmId": str(uuid.uuid4()),
                    "osProfile": {"adminUsername": "azureuser", "computerName": name},
                },
            }
        self._roll_out(group, vmss)

    def _roll_out(self, group: str, vmss: dict) -> None:
        """The scale set's extensions on its instances as the rolling upgrade leaves them: each instance
        gets the model's (its forceUpdateTag, Succeeded), except the first `lagging_instances`, which
        keep what they had (the upgrade has not reached them yet)."""
        mine = [
            r
            for r in self._list(group, "Microsoft.Compute/virtualMachines", "")
            if r["properties"].get("virtualMachineScaleSet", {}).get("id", "").lower() == vmss["id"].lower()
        ]
        profile = vmss["properties"].get("virtualMachineProfile", {})
        for i, vm in enumerate(mine):
            for ext in profile.get("extensionProfile", {}).get("extensions", []):
                key = _key(group, vm["name"], "extensions", ext["name"])
                if i < self.lagging_instances and key in self.extensions:
                    continue
                props = {k: v for k, v in ext.get("properties", {}).items() if k != "protectedSettings"}
                props["provisioningState"] = "Succeeded"
                self.extensions[key] = {
                    "vmId": vm["properties"]["vmId"],
                    "resource": {
                        "id": f"{vm['id']}/extensions/{ext['name']}",
                        "name": ext["name"],
                        "type": "Microsoft.Compute/virtualMachines/extensions",
                        "location": vm["location"],
                        "properties": props,
                    },
                }

    def set_capacity(self, group: str, vmss: str, capacity: int) -> None:
        """What autoscale does between deploys: change the scale set's capacity (and its instances)."""
        with self.lock:
            resource = self.resources[_key(group, "Microsoft.Compute/virtualMachineScaleSets", vmss)]
            resource["sku"]["capacity"] = capacity
            self._reconcile_instances(group, resource)

    def _postgres(self, group: str, name: str, resource: dict, existing: dict | None) -> None:
        """PostgreSQL Flexible Server with private access: the delegated subnet and the private DNS zone
        must exist (the subnet delegated to it), the admin password is write-only, the name is a DNS name."""
        props = resource["properties"]
        net = props.get("network", {})
        subnet_id = net.get("delegatedSubnetResourceId", "")
        self._require(subnet_id, "the flexible server")
        self._require(net.get("privateDnsZoneArmResourceId"), "the flexible server")
        if subnet_id:
            parts = [p for p in subnet_id.split("/") if p]
            vnet = self.resources[_key(parts[3], parts[5] + "/" + parts[6], parts[7])]
            subnet = next(x for x in vnet["properties"]["subnets"] if x["name"].lower() == parts[9].lower())
            services = [
                d.get("properties", {}).get("serviceName")
                for d in subnet["properties"].get("delegations", [])
            ]
            if "Microsoft.DBforPostgreSQL/flexibleServers" not in services:
                raise ArmError(
                    400,
                    "SubnetNotDelegated",
                    f"Subnet {parts[9]} must be delegated to Microsoft.DBforPostgreSQL/flexibleServers.",
                )
        password = props.pop("administratorLoginPassword", None)
        if existing is None and not password:
            raise ArmError(400, "InvalidParameterValue", "administratorLoginPassword is required.")
        self.secrets[_key(group, name, "password")] = {"password": password or self.db_password(group, name)}
        props["fullyQualifiedDomainName"] = f"{name}.postgres.database.azure.com"
        props["state"] = "Updating" if existing else "Creating"

    def db_password(self, group: str, server: str) -> str:
        with self.lock:
            return (self.secrets.get(_key(group, server, "password")) or {}).get("password", "")

    def _autoscale(self, key: str, resource: dict, existing: dict | None):
        """Autoscale settings are not long-running: ARM answers the PUT at once. The target must exist
        and the bounds make sense."""
        props = resource["properties"]
        self._require(props.get("targetResourceUri"), "the autoscale setting")
        for profile in props.get("profiles", []):
            cap = profile.get("capacity", {})
            low, high, default = (int(cap.get(k, -1)) for k in ("minimum", "maximum", "default"))
            if not 0 <= low <= default <= high:
                raise ArmError(
                    400, "InvalidParameter", f"capacity {cap} is not minimum <= default <= maximum"
                )
        self.resources[key] = resource
        return (200 if existing else 201), resource, {}

    def _nested(self, method, group, ptype, parent, child_type, name, body):
        """A child resource of another (a private zone's network link, a server's database or setting)."""
        parent_key = _key(group, ptype, parent)
        if parent_key not in self.resources:
            raise ArmError(404, "ParentResourceNotFound", f"Parent resource '{parent}' not found.")
        key = _key(group, ptype, parent, child_type, name)
        existing = self.resources.get(key)
        rid = f"{self.resources[parent_key]['id']}/{child_type}/{name}"
        if method == "GET":
            if not existing:
                raise ArmError(404, "ResourceNotFound", f"The Resource '{rid}' was not found.")
            return 200, existing, {}
        if method == "DELETE":
            self.resources.pop(key, None)
            return 202, None, self._lro_headers(self._operation(None))
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", method)
        resource = json.loads(json.dumps(body or {}))
        resource.update({"id": rid, "name": name, "type": f"{ptype}/{child_type}"})
        props = resource.setdefault("properties", {})
        if child_type.lower() == "virtualnetworklinks":
            self._require(props.get("virtualNetwork", {}).get("id"), "the virtual network link")
        props["provisioningState"] = "Updating" if existing else "Creating"
        self.resources[key] = resource

        def done():
            props["provisioningState"] = "Succeeded"

        op = self._operation(done)
        if ptype.lower().startswith("microsoft.dbforpostgresql/"):
            return 202, None, self._lro_headers(op)  # this API accepts a PUT with 202 and no body
        return (200 if existing else 201), resource, self._lro_headers(op)

    def _nsg(self, resource: dict) -> None:
        """One rule's source prefixes must be of one address family, as ARM checks."""
        for rule in resource["properties"].get("securityRules", []):
            p = rule.get("properties", {})
            prefixes = p.get("sourceAddressPrefixes") or [p.get("sourceAddressPrefix", "")]
            families = {":" in x for x in prefixes if x[:1].isdigit() or ":" in x}
            if len(families) > 1:
                raise ArmError(
                    400,
                    "ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies",
                    f"Security rule {rule.get('name')} has address prefixes from different address "
                    "families (IPv4 and IPv6).",
                )

    def _delete_vm(self, group: str, name: str, vm: dict) -> None:
        """A VM goes with the NICs and OS disk whose deleteOption is Delete; the public IP stays."""
        props = vm["properties"]
        doomed = [
            n["id"]
            for n in props.get("networkProfile", {}).get("networkInterfaces", [])
            if n.get("properties", {}).get("deleteOption") == "Delete"
        ]
        disk = props.get("storageProfile", {}).get("osDisk", {})
        if disk.get("deleteOption") == "Delete":
            doomed.append(disk.get("managedDisk", {}).get("id", ""))
        for rid in doomed:
            parts = [p for p in rid.split("/") if p]
            if len(parts) == 8:
                self.resources.pop(_key(parts[3], parts[5] + "/" + parts[6], parts[7]), None)
        key = _key(group, "Microsoft.Compute/virtualMachines", name)
        self.resources.pop(key, None)
        self.vm_failures.pop(key, None)
        self.secrets.pop(_key(group, name), None)

    def _patch_disk(self, existing, ptype, name, group, body):
        """A disk update (PATCH): what is sent replaces what was, tags included, as in ARM."""
        if not existing:
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource '{ptype}/{name}' under resource group '{group}' was not found.",
            )
        body = body or {}
        if "tags" in body:
            existing["tags"] = dict(body["tags"])
        existing["properties"].update(body.get("properties", {}))
        op = self._operation(None)
        return 200, existing, self._lro_headers(op)

    def _exists(self, rid: str) -> bool:
        parts = [p for p in rid.split("/") if p]
        if len(parts) == 8:
            return _key(parts[3], parts[5] + "/" + parts[6], parts[7]) in self.resources
        if len(parts) == 10:  # a part listed in its parent (a subnet, a load balancer's pool or probe)
            parent = self.resources.get(_key(parts[3], parts[5] + "/" + parts[6], parts[7]))
            return bool(parent) and any(
                s["name"].lower() == parts[9].lower() for s in parent["properties"].get(parts[8], [])
            )
        return False

    def _require(self, rid: str | None, what: str) -> None:
        if rid and not self._exists(rid):
            raise ArmError(
                400, "InvalidResourceReference", f"Resource {rid} referenced by {what} was not found."
            )

    def _public_ip(self, resource: dict, existing: dict | None) -> None:
        props = resource["properties"]
        standard = resource.get("sku", {}).get("name") == "Standard"
        if standard and props.get("publicIPAllocationMethod") != "Static":
            raise ArmError(
                400,
                "StandardSkuPublicIPAddressesCanOnlyBeStatic",
                "Standard sku publicIp can only use Static allocation method.",
            )
        label = props.get("dnsSettings", {}).get("domainNameLabel")
        if label:
            for other in self.resources.values():
                same = other["id"].lower() == resource["id"].lower()
                olabel = other.get("properties", {}).get("dnsSettings", {}).get("domainNameLabel")
                if not same and olabel == label and other["location"] == resource["location"]:
                    raise ArmError(
                        400,
                        "DnsRecordInUse",
                        f"DNS record {label}.{resource['location']}."
                        "cloudapp.azure.com is already used by another public IP.",
                    )
            props["dnsSettings"]["fqdn"] = f"{label}.{resource['location']}.cloudapp.azure.com"
        props["ipAddress"] = (existing or {}).get("properties", {}).get("ipAddress", self.public_ip)

    def _nic(self, resource: dict) -> None:
        props = resource["properties"]
        self._require(props.get("networkSecurityGroup", {}).get("id"), "the network interface")
        for conf in props.get("ipConfigurations", []):
            cprops = conf.get("properties", {})
            self._require(cprops.get("subnet", {}).get("id"), "an IP configuration")
            self._require(cprops.get("publicIPAddress", {}).get("id"), "an IP configuration")
            conf["id"] = f"{resource['id']}/ipConfigurations/{conf['name']}"

    def _vm(self, group: str, name: str, resource: dict, existing: dict | None) -> None:
        props = resource["properties"]
        size = props.get("hardwareProfile", {}).get("vmSize", "")
        if resource["location"] in self.restricted.get(size.lower(), {}):
            raise ArmError(
                409,
                "SkuNotAvailable",
                f"The requested VM size for resource 'Following SKUs have failed for Capacity "
                f"Restrictions: {size}' is currently not available in location "
                f"'{resource['location']}'. Please try another size or deploy to a different "
                "location or different zone.",
            )
        old_size = (existing or {}).get("properties", {}).get("hardwareProfile", {}).get("vmSize", "")
        self._enforce_quota(resource["location"], size, 1, old_size, 1 if existing else 0)
        for nic in props.get("networkProfile", {}).get("networkInterfaces", []):
            self._require(nic.get("id"), "the virtual machine")
        os_profile = props.get("osProfile", {})
        skey = _key(group, name)
        stored = self.secrets.get(skey)
        if existing and stored:
            sent = os_profile.pop("customData", None)
            if sent is not None and sent != stored["customData"]:
                raise ArmError(
                    409, "PropertyChangeNotAllowed", "Changing property 'customData' is not allowed."
                )
            old_user = existing["properties"]["osProfile"]["adminUsername"]
            if os_profile.get("adminUsername", old_user) != old_user:
                raise ArmError(
                    409,
                    "PropertyChangeNotAllowed",
                    "Changing property 'osProfile.adminUsername' is not allowed.",
                )
            props["osProfile"] = {**existing["properties"]["osProfile"], **os_profile}
            props["vmId"] = existing["properties"]["vmId"]
        else:
            self.secrets[skey] = {"customData": os_profile.pop("customData", "")}
            os_profile.pop("adminPassword", None)
            props["vmId"] = str(uuid.uuid4())
            disk = props.get("storageProfile", {}).get("osDisk", {})
            disk_name = disk.get("name") or f"{name}_OsDisk_1"
            did = (
                f"/subscriptions/{self.subscription}/resourceGroups/{group}/providers/"
                f"Microsoft.Compute/disks/{disk_name}"
            )
            disk.setdefault("managedDisk", {})["id"] = did
            self.resources[_key(group, "Microsoft.Compute/disks", disk_name)] = {
                "id": did,
                "name": disk_name,
                "type": "Microsoft.Compute/disks",
                "location": resource["location"],
                "properties": {"diskSizeGB": disk.get("diskSizeGB", 30), "provisioningState": "Succeeded"},
            }

    def _vm_action(self, method, group, name, tail, body):
        key = _key(group, "Microsoft.Compute/virtualMachines", name)
        vm = self.resources.get(key)
        if not vm:
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.Compute/virtualMachines/{name}' "
                f"under resource group '{group}' was not found.",
            )
        action = tail[0]
        if action == "instanceview" and method == "GET":
            return 200, self._instance_view(key), {}
        if action == "start" and method == "POST":
            op = self._operation(lambda: setattr(self, "power_state", "running"))
            return 202, None, self._lro_headers(op)
        if action == "retrievebootdiagnosticsdata" and method == "POST":
            return (
                200,
                {
                    "consoleScreenshotBlobUri": f"{self.url}/fake/bootdiag/{name}/screenshot.bmp?sig=x",
                    "serialConsoleLogBlobUri": f"{self.url}/fake/bootdiag/{name}/serial.log?sig=x",
                },
                {},
            )
        if action == "runcommand" and method == "POST":
            if self.power_state != "running":
                raise ArmError(
                    409, "OperationNotAllowed", "Cannot run a command on a VM that is not running."
                )
            script = "\n".join((body or {}).get("script", []))
            self.run_commands.append(script)
            op = self._operation(None)
            output = self.vm_shell(script)
            self.operations[op].result = {
                "value": [
                    {
                        "code": "ProvisioningState/succeeded",
                        "level": "Info",
                        "displayStatus": "Provisioning succeeded",
                        "message": f"Enable succeeded: \n[stdout]\n{output}\n[stderr]\n",
                    }
                ]
            }
            return 202, None, self._lro_headers(op, result=True)
        raise ArmError(404, "NotFound", f"No action {action}")

    # -- VM extensions (the Custom Script extension) ---------------------------------------------------
    def protected_settings(self, group: str, vm: str, name: str) -> dict:
        """What an extension was given in protectedSettings: write-only in Azure, so only the fake has it."""
        with self.lock:
            return self.secrets[_key(group, vm, "extensions", name)]["protectedSettings"]

    def _extension(self, method, group, vm_name, name, body):
        """Azure's VM extension resource: a PUT is an LRO that ends when the VM agent has run it (here at
        once), protectedSettings are kept apart and never returned, and an extension goes with its VM (a
        VM made again under the same name has none)."""
        vm = self.resources.get(_key(group, "Microsoft.Compute/virtualMachines", vm_name))
        if not vm:
            raise ArmError(
                404,
                "ParentResourceNotFound",
                f"Can not perform requested operation on nested resource. "
                f"Parent resource '{vm_name}' not found.",
            )
        key = _key(group, vm_name, "extensions", name)
        found = self.extensions.get(key)
        if found and found["vmId"] != vm["properties"]["vmId"]:
            found = None
        if method == "GET":
            if not found:
                raise ArmError(
                    404,
                    "NotFound",
                    f"The entity was not found in this Azure location. Extension '{name}' of VM '{vm_name}'.",
                )
            return 200, found["resource"], {}
        if method == "DELETE":
            self.extensions.pop(key, None)
            self.secrets.pop(key, None)
            op = self._operation(None)
            return 202, None, self._lro_headers(op)
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", method)
        if not isinstance(body, dict) or "location" not in body:
            raise ArmError(400, "LocationRequired", "The location property is required for this definition.")
        resource = json.loads(json.dumps(body))
        props = resource.setdefault("properties", {})
        for required in ("publisher", "type", "typeHandlerVersion"):
            if not props.get(required):
                raise ArmError(400, "InvalidParameter", f"Required parameter '{required}' is missing (null).")
        self.secrets[key] = {"protectedSettings": props.pop("protectedSettings", None)}
        resource.update(
            {
                "id": f"{vm['id']}/extensions/{name}",
                "name": name,
                "type": "Microsoft.Compute/virtualMachines/extensions",
                "location": body["location"].lower(),
            }
        )
        props["provisioningState"] = "Updating" if found else "Creating"
        self.extensions[key] = {"vmId": vm["properties"]["vmId"], "resource": resource}

        def done():
            props["provisioningState"] = "Succeeded"

        op = self._operation(done)
        return (200 if found else 201), resource, self._lro_headers(op)

    def _instance_view(self, key: str = "") -> dict:
        failure = self.vm_failures.get(key)
        if failure:
            return {
                "statuses": [
                    {
                        "code": f"ProvisioningState/failed/{failure['code']}",
                        "level": "Error",
                        "displayStatus": "Provisioning failed",
                        "message": failure["message"],
                    }
                ]
            }
        view = {
            "computerName": "qwen-box",
            "osName": "ubuntu",
            "osVersion": "24.04",
            "statuses": [
                {
                    "code": "ProvisioningState/succeeded",
                    "level": "Info",
                    "displayStatus": "Provisioning succeeded",
                },
                {
                    "code": f"PowerState/{self.power_state}",
                    "level": "Info",
                    "displayStatus": f"VM {self.power_state}",
                },
            ],
        }
        vm = self.resources.get(key) or {}
        if vm.get("properties", {}).get("virtualMachineScaleSet"):
            verdict = self.instance_health.get(vm["name"], "healthy")
            view["vmHealth"] = {"status": {"code": f"HealthState/{verdict}", "level": "Info"}}
        return view

    def _skus(self, filt: str) -> list[dict]:
        match = re.search(r"location eq '([^']*)'", filt)
        region = match.group(1).lower() if match else "eastus"
        out = []
        for size, (family, vcpus) in SKU_INFO.items():
            reason = self.restricted.get(size.lower(), {}).get(region)
            out.append(
                {
                    "resourceType": "virtualMachines",
                    "name": size,
                    "tier": "Standard",
                    "size": size.split("_", 1)[1],
                    "family": family,
                    "locations": [region],
                    "locationInfo": [{"location": region, "zones": ["1", "2", "3"], "zoneDetails": []}],
                    "capabilities": [
                        {"name": "vCPUs", "value": str(vcpus)},
                        {"name": "MemoryGB", "value": "4"},
                        {"name": "vCPUsAvailable", "value": str(vcpus)},
                    ],
                    "restrictions": [
                        {
                            "type": "Location",
                            "values": [region],
                            "reasonCode": reason,
                            "restrictionInfo": {"locations": [region]},
                        }
                    ]
                    if reason
                    else [],
                }
            )
        # Not a VM size: ARM lists every resource type's SKUs (disks too) in the same answer.
        out.append(
            {"resourceType": "disks", "name": "StandardSSD_LRS", "tier": "Standard", "locations": [region]}
        )
        return out

    def used_vcpus(self, region: str) -> dict[str, int]:
        """vCPUs of the VMs this fake holds in `region` (a scale set's instances are VMs), per family."""
        used: dict[str, int] = {}
        for r in self.resources.values():
            if r["type"].lower() != "microsoft.compute/virtualmachines" or r["location"] != region:
                continue
            size = r["properties"].get("hardwareProfile", {}).get("vmSize", "")
            info = next((v for k, v in SKU_INFO.items() if k.lower() == str(size).lower()), None)
            if info:
                used[info[0]] = used.get(info[0], 0) + info[1]
        return used

    def _enforce_quota(
        self, region: str, size: str, count: int, old_size: str = "", old_count: int = 0
    ) -> None:
        """Refuse a PUT that would take a family or the region over its vCPU limit, as Azure does (409
        OperationNotAllowed); what the resource held before (`old_size` x `old_count`) is counted already."""
        info = {k.lower(): v for k, v in SKU_INFO.items()}
        new, old = info.get(size.lower()), info.get(old_size.lower())
        if new is None:
            return
        family, vcpus = new
        held = old[1] * old_count if old else 0
        used = self.used_vcpus(region)
        others, limit = self.quota.get(family, (0, DEFAULT_FAMILY_LIMIT))
        checks = [
            (
                family,
                others + used.get(family, 0),
                limit,
                vcpus * count - (held if old and old[0] == family else 0),
            ),
            (
                "Total Regional",
                self.regional_cores[0] + sum(used.values()),
                self.regional_cores[1],
                vcpus * count - held,
            ),
        ]
        for name, current, cap, need in checks:
            if need > 0 and current + need > cap:
                raise ArmError(
                    409,
                    "OperationNotAllowed",
                    "Operation could not be completed as it results in exceeding approved "
                    f"{name} Cores quota. Additional details - Deployment Model: Resource Manager, "
                    f"Location: {region}, Current "
                    f"Limit: {cap}, Current Usage: {current}, Additional Required: {need}, (Minimum) New "
                    f"Limit Required: {current + need}.",
                )

    def _usages(self, region: str) -> list[dict]:
        """Microsoft.Compute/locations/{region}/usages: per-family vCPUs and the regional total ("cores"),
        each {unit, currentValue, limit, name: {value, localizedValue}}, beside other counters."""
        used = self.used_vcpus(region.lower())

        def usage(name: str, label: str, current: int, limit: int) -> dict:
            return {
                "unit": "Count",
                "currentValue": current,
                "limit": limit,
                "name": {"value": name, "localizedValue": label},
            }

        regional = self.regional_cores
        out = [
            usage("availabilitySets", "Availability Sets", 0, 2500),
            usage("cores", "Total Regional vCPUs", regional[0] + sum(used.values()), regional[1]),
            usage("virtualMachines", "Virtual Machines", 0, 25000),
        ]
        for family, label in FAMILY_LABELS.items():
            others, limit = self.quota.get(family, (0, DEFAULT_FAMILY_LIMIT))
            out.append(usage(family, label, others + used.get(family, 0), limit))
        return out

    # -- long-running operations ----------------------------------------------------------------
    def _operation(self, on_done: Callable[[], None] | None) -> str:
        op_id = f"op{next(self._ids)}"
        self.operations[op_id] = Operation(self.polls, on_done)
        return op_id

    def _lro_headers(self, op: str, result: bool = False) -> dict[str, str]:
        headers = {"Azure-AsyncOperation": f"{self.url}/fake/operations/{op}", "Retry-After": "0"}
        if result:
            headers["Location"] = f"{self.url}/fake/results/{op}"
        return headers

    def _advance(self, op: Operation) -> None:
        if op.done:
            return
        if op.polls_left > 0:
            op.polls_left -= 1
            return
        op.done = True
        if op.error is None and op.on_done:
            op.on_done()
        if op.error is not None and op.on_error:
            op.on_error()

    def _fake_endpoint(self, method: str, path: str):
        parts = path.split("/")
        if parts[2] == "bootdiag":
            return 200, {"_raw": self.serial_log}, {}
        op = self.operations.get(parts[3])
        if not op:
            raise ArmError(404, "NotFound", "no such operation")
        if parts[2] == "operations":
            self._advance(op)
            if not op.done:
                return 200, {"status": "InProgress"}, {"Retry-After": "0"}
            if op.error:
                return 200, {"status": "Failed", "error": op.error}, {}
            return 200, {"status": "Succeeded"}, {}
        if parts[2] == "locations":
            self._advance(op)
            return (202, None, {"Retry-After": "0"}) if not op.done else (200, None, {})
        if parts[2] == "results":
            return (200, op.result, {}) if op.done else (202, None, {"Retry-After": "0"})
        raise ArmError(404, "NotFound", path)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    arm: FakeArm

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _serve(self) -> None:
        split = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            signed = self.arm.sign_in(self.command, split.path, raw)
            if signed:
                status, payload, extra = signed
            else:
                body = json.loads(raw) if raw else None
                status, payload, extra = self.arm.handle(self.command, split.path, query, body, headers)
        except ArmError as e:
            status, payload, extra = e.status, {"error": {"code": e.code, "message": e.message}}, e.headers
        except json.JSONDecodeError as e:
            status, payload, extra = 400, {"error": {"code": "InvalidRequestContent", "message": str(e)}}, {}
        if payload is not None and "_raw" in payload:
            data, ctype = payload["_raw"].encode(), "text/plain"
        else:
            data, ctype = (json.dumps(payload).encode() if payload is not None else b""), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _serve
