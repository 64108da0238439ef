"""The ARM request bodies of one deployment: the REST JSON itself, so what is sent reads like Azure's
own documentation (and tests/fake_arm.py answers it as Azure would).

Pure functions of a `Deployment` (plus the ids Azure hands back), no SDK: provision.py sends them.
The VM's tags also record what it runs (fingerprints of the container's config and secret settings,
the certificate mode), so a re-deploy can tell what changed without anything secret in a tag.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from infra.azure.deployment import ADMIN_USER, INTERNET, SUBNET_PREFIX, UBUNTU_2404, VNET_PREFIX, Deployment
from infra.azure.errors import AzureActionError
from infra.vm import cloudinit

Body = dict[str, Any]
CONFIG_TAG = "qwen-box-config"
SECRETS_TAG = "qwen-box-secrets"
REGISTRY_TAG = "qwen-box-registry"
DELIVERY_TAG = "qwen-box-secrets-via"  # "extension": the VM waits for its secrets from SECRETS_EXTENSION
SECRETS_EXTENSION = "qwen-box-secrets"
TLS_TAG = "qwen-box-tls"  # the certificate mode (infra/vm/caddy.py), "off" for plain HTTP
HTTPS_RULE, REDIRECT_RULE, HTTP_RULE = "allow-chat-https", "allow-http-redirect", "allow-chat-http"


def _rule(name: str, priority: int, port: int, sources: tuple[str, ...], description: str) -> Body:
    props: Body = {
        "priority": priority,
        "direction": "Inbound",
        "access": "Allow",
        "protocol": "Tcp",
        "sourcePortRange": "*",
        "destinationAddressPrefix": "*",
        "destinationPortRange": str(port),
        "description": description,
    }
    if len(sources) == 1:
        props["sourceAddressPrefix"] = sources[0]
    else:
        props["sourceAddressPrefixes"] = list(sources)
    return {"name": name, "properties": props}


def nsg_body(d: Deployment) -> Body:
    """Inbound: the chat port from the allowed sources (or the Internet with --public); with HTTPS also
    port 80, for the redirect and the certificate challenge (see Deployment.redirect_sources); SSH only
    if asked."""
    if not d.http_sources:
        raise AzureActionError("no source address to allow: pass --allow-from CIDR or --public")
    public = " - public" if d.public else ""
    if d.tls:
        rules = [
            _rule(HTTPS_RULE, 100, d.port, d.http_sources, "qwen-box chat (HTTPS)" + public),
            _rule(
                REDIRECT_RULE,
                105,
                80,
                d.redirect_sources,
                "qwen-box: HTTP redirect to HTTPS and certificate challenge (no chat)",
            ),
        ]
    else:
        rules = [_rule(HTTP_RULE, 100, d.port, d.http_sources, "qwen-box chat (HTTP)" + public)]
    if d.ssh:
        ssh_sources = d.ssh_from or d.allow_from
        if not ssh_sources or INTERNET in ssh_sources:
            raise AzureActionError("--ssh needs a source address: pass --allow-from CIDR")
        rules.append(_rule("allow-ssh", 110, 22, ssh_sources, "qwen-box SSH (key only)"))
    return {"location": d.region, "tags": d.tags, "properties": {"securityRules": rules}}


def vnet_body(d: Deployment) -> Body:
    return {
        "location": d.region,
        "tags": d.tags,
        "properties": {
            "addressSpace": {"addressPrefixes": [VNET_PREFIX]},
            "subnets": [{"name": d.subnet, "properties": {"addressPrefix": SUBNET_PREFIX}}],
        },
    }


def public_ip_body(d: Deployment) -> Body:
    """Standard SKU, static, with the DNS label that makes the stable NAME.REGION.cloudapp.azure.com."""
    return {
        "location": d.region,
        "tags": d.tags,
        "sku": {"name": "Standard", "tier": "Regional"},
        "properties": {
            "publicIPAllocationMethod": "Static",
            "publicIPAddressVersion": "IPv4",
            "idleTimeoutInMinutes": 30,
            "dnsSettings": {"domainNameLabel": d.name},
        },
    }


def nic_body(d: Deployment, subnet_id: str, ip_id: str, nsg_id: str) -> Body:
    return {
        "location": d.region,
        "tags": d.tags,
        "properties": {
            "networkSecurityGroup": {"id": nsg_id},
            "ipConfigurations": [
                {
                    "name": "ipconfig1",
                    "properties": {
                        "privateIPAllocationMethod": "Dynamic",
                        "subnet": {"id": subnet_id},
                        "publicIPAddress": {"id": ip_id},
                    },
                }
            ],
        },
    }


def vm_tags(d: Deployment) -> dict[str, str]:
    """The deployment's tags plus fingerprints of what the container runs (see cloudinit.config_digest)."""
    tags = {
        **d.tags,
        TLS_TAG: d.cert or "off",
        CONFIG_TAG: cloudinit.config_digest(d.image, d.port, d.env, caddyfile=d.caddyfile, model=d.model),
    }
    secrets = cloudinit.secrets_digest(d.name, d.env)
    if secrets:
        tags[SECRETS_TAG] = secrets
    registry = cloudinit.registry_digest(d.name, d.registry)
    if registry:
        tags[REGISTRY_TAG] = registry
    return tags


def secrets_extension_body(d: Deployment, retry: str = "") -> Body:
    """The Custom Script extension (Linux, v2.1) that writes the VM's secrets (cloudinit.secrets_script).

    The script goes in protectedSettings, which Azure encrypts to a certificate only the VM holds and never
    returns by GET; custom_data stays free of secrets. `forceUpdateTag` is the secrets' salted
    fingerprint (the same as the VM's tags), so a changed secret runs the script again and a re-deploy
    with the same ones does not (`retry` changes it for a delivery that failed). No public `settings`
    at all: they would be readable.
    """
    script = cloudinit.secrets_script(d.env, d.registry)
    tag = cloudinit.secrets_digest(d.name, d.env) + cloudinit.registry_digest(d.name, d.registry) + retry
    return {
        "location": d.region,
        "tags": d.tags,
        "properties": {
            "publisher": "Microsoft.Azure.Extensions",
            "type": "CustomScript",
            "typeHandlerVersion": "2.1",
            "autoUpgradeMinorVersion": True,
            "forceUpdateTag": hashlib.sha256(tag.encode()).hexdigest()[:16],
            "protectedSettings": {"script": base64.b64encode(script.encode()).decode()},
        },
    }


def os_disk(d: Deployment) -> dict[str, Any]:
    """The OS disk every instance gets (a VM's also carries its name): deleted with the VM."""
    return {
        "createOption": "FromImage",
        "diskSizeGB": d.disk_gb,
        "caching": "ReadWrite",
        "deleteOption": "Delete",
        "managedDisk": {"storageAccountType": "StandardSSD_LRS"},
    }


def linux_configuration(ssh_key: str) -> dict[str, Any]:
    """SSH keys only (no password), and the VM agent that runs the secrets extension."""
    return {
        "disablePasswordAuthentication": True,
        "provisionVMAgent": True,
        "ssh": {"publicKeys": [{"path": f"/home/{ADMIN_USER}/.ssh/authorized_keys", "keyData": ssh_key}]},
    }


def vm_body(d: Deployment, nic_id: str, ssh_key: str, custom_data_b64: str) -> Body:
    """Ubuntu 24.04 Gen2, SSH key only (no password login), boot diagnostics, disk/NIC deleted with it.
    Its custom_data holds no secret: they follow in secrets_extension_body."""
    return {
        "location": d.region,
        "tags": {**vm_tags(d), DELIVERY_TAG: "extension"},
        "properties": {
            "hardwareProfile": {"vmSize": d.size},
            "storageProfile": {
                "imageReference": dict(UBUNTU_2404),
                "osDisk": {"name": d.os_disk, **os_disk(d)},
            },
            "osProfile": {
                "computerName": d.name,
                "adminUsername": ADMIN_USER,
                "customData": custom_data_b64,
                "linuxConfiguration": linux_configuration(ssh_key),
            },
            "networkProfile": {
                "networkInterfaces": [
                    {"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}
                ]
            },
            "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
        },
    }
