"""The ARM request bodies of a scale-set deployment (`--instances`): the REST JSON itself, as arm.py
is for one VM, pure functions of a `Deployment` and the ids Azure hands back.

What is there and why:

- a VM Scale Set in Flexible orchestration (the mode Azure recommends for new scale sets; its instances
  are ordinary VMs) from the single VM's image, cloud-init and size, no public IP per instance;
- a Standard public load balancer on the deployment's static IP and DNS label: rules for the chat port
  and 80, an HTTPS probe on /api/health (a loading instance answers 503 and stays out of rotation),
  client-IP affinity (SourceIP), so a conversation keeps reaching the instance holding its KV cache;
- a NAT gateway with its own public IP for outbound traffic (pulling the image): new virtual networks
  have no default outbound access, and the load balancer's rules have outbound SNAT off;
- the Application Health extension on the same /api/health, which automatic instance repair and the
  rolling upgrade policy watch (Flexible orchestration takes no load balancer probe for those:
  `networkProfile.healthProbe` is a Uniform-orchestration property);
- the secrets extension (Custom Script, protectedSettings) as for one VM, carrying also the certificate
  and the database URL, and the image and settings, so that a new image rolls out through the rolling
  upgrade policy, one instance at a time, each healthy before the next;
- an autoscale setting (Azure Monitor) on average CPU, between MIN and MAX;
- PostgreSQL Flexible Server (Burstable B1ms) reachable only from the virtual network (a delegated
  subnet and a private DNS zone linked to the network), TLS required, for the shared history.
"""

from __future__ import annotations

import base64
import hashlib

from infra.azure.arm import SECRETS_EXTENSION, TLS_TAG, Body, _rule, linux_configuration, nsg_body, os_disk
from infra.azure.deployment import (
    ADMIN_USER,
    DB_ADMIN,
    DB_NAME,
    DB_SUBNET_PREFIX,
    SUBNET_PREFIX,
    UBUNTU_2404,
    VNET_PREFIX,
    Deployment,
)
from infra.vm import cloudinit

HEALTH_EXTENSION = "qwen-box-health"
PROBE = "health"
POOL = "instances"
FRONTEND = "frontend"
DB_SKU = {"name": "Standard_B1ms", "tier": "Burstable"}
DB_VERSION = "16"
DB_STORAGE_GB = 32
MODEL_TAG = "qwen-box-model"  # fingerprint of the scale set's model (profile and extensions, no secret)
PROBE_RULE = "allow-lb-probe"
SCALE_OUT_CPU, SCALE_IN_CPU = 70, 25  # percent, average over the window
REPAIR_GRACE = "PT30M"  # a new instance installs Docker, pulls ~4 GB and loads the model before healthy
PG_DELEGATION = "Microsoft.DBforPostgreSQL/flexibleServers"


def resource_id(subscription: str, group: str, provider_type: str, name: str) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{group}/providers/{provider_type}/{name}"


def scale_nsg_body(d: Deployment) -> Body:
    """The single VM's rules (the deployer's address only, unless told otherwise), plus the load
    balancer's probes by their service tag, so they reach every instance on the chat port whatever the
    allow-list says (Azure's default rules allow them too; this one says so where it is read)."""
    body = nsg_body(d)
    body["properties"]["securityRules"].append(
        _rule(PROBE_RULE, 120, d.port, ("AzureLoadBalancer",), "qwen-box: the load balancer's health probe")
    )
    return body


def nat_ip_body(d: Deployment) -> Body:
    """The NAT gateway's outbound address: Standard, static, no DNS name."""
    return {
        "location": d.region,
        "tags": d.tags,
        "sku": {"name": "Standard", "tier": "Regional"},
        "properties": {"publicIPAllocationMethod": "Static", "publicIPAddressVersion": "IPv4"},
    }


def nat_body(d: Deployment, nat_ip_id: str) -> Body:
    return {
        "location": d.region,
        "tags": d.tags,
        "sku": {"name": "Standard"},
        "properties": {"idleTimeoutInMinutes": 4, "publicIpAddresses": [{"id": nat_ip_id}]},
    }


def scale_vnet_body(d: Deployment, nat_id: str) -> Body:
    """The instances' subnet (outbound through the NAT gateway) and the database's, delegated to
    PostgreSQL Flexible Server (which needs a subnet of its own)."""
    return {
        "location": d.region,
        "tags": d.tags,
        "properties": {
            "addressSpace": {"addressPrefixes": [VNET_PREFIX]},
            "subnets": [
                {
                    "name": d.subnet,
                    "properties": {
                        "addressPrefix": SUBNET_PREFIX,
                        "natGateway": {"id": nat_id},
                        "defaultOutboundAccess": False,
                    },
                },
                {
                    "name": d.db_subnet,
                    "properties": {
                        "addressPrefix": DB_SUBNET_PREFIX,
                        "delegations": [{"name": "postgres", "properties": {"serviceName": PG_DELEGATION}}],
                        "defaultOutboundAccess": False,
                    },
                },
            ],
        },
    }


def lb_body(d: Deployment, lb_id: str, ip_id: str) -> Body:
    """Standard SKU on the deployment's public IP: the chat port and 80 to every healthy instance,
    chosen by the client's address (SourceIP: the same client keeps reaching the same instance while
    it stays healthy), probed over HTTPS on /api/health, outbound SNAT off (the NAT gateway does it)."""
    frontend = {"id": f"{lb_id}/frontendIPConfigurations/{FRONTEND}"}
    pool = {"id": f"{lb_id}/backendAddressPools/{POOL}"}
    probe = {"id": f"{lb_id}/probes/{PROBE}"}

    def rule(name: str, port: int) -> Body:
        return {
            "name": name,
            "properties": {
                "frontendIPConfiguration": frontend,
                "backendAddressPool": pool,
                "probe": probe,
                "protocol": "Tcp",
                "frontendPort": port,
                "backendPort": port,
                "loadDistribution": "SourceIP",
                "idleTimeoutInMinutes": 30,
                "enableTcpReset": True,
                "disableOutboundSnat": True,
            },
        }

    return {
        "location": d.region,
        "tags": d.tags,
        "sku": {"name": "Standard", "tier": "Regional"},
        "properties": {
            "frontendIPConfigurations": [
                {"name": FRONTEND, "properties": {"publicIPAddress": {"id": ip_id}}}
            ],
            "backendAddressPools": [{"name": POOL}],
            "probes": [
                {
                    "name": PROBE,
                    "properties": {
                        "protocol": "Https",
                        "port": d.port,
                        "requestPath": "/api/health",
                        "intervalInSeconds": 5,
                        "probeThreshold": 2,
                    },
                }
            ],
            "loadBalancingRules": [rule("chat-https", d.port), rule("http-redirect", 80)],
        },
    }


def dns_zone_body(d: Deployment) -> Body:
    return {"location": "global", "tags": d.tags}


def dns_link_body(d: Deployment, vnet_id: str) -> Body:
    return {
        "location": "global",
        "tags": d.tags,
        "properties": {"virtualNetwork": {"id": vnet_id}, "registrationEnabled": False},
    }


def db_server_body(d: Deployment, subnet_id: str, zone_id: str, password: str) -> Body:
    """Burstable B1ms, 32 GiB, no public access (the delegated subnet and the private zone only), password
    login for the service's one user; TLS is required (require_secure_transport, on by default and set
    again by db_tls_body)."""
    return {
        "location": d.region,
        "tags": d.tags,
        "sku": dict(DB_SKU),
        "properties": {
            "version": DB_VERSION,
            "administratorLogin": DB_ADMIN,
            "administratorLoginPassword": password,
            "createMode": "Create",
            "storage": {"storageSizeGB": DB_STORAGE_GB, "autoGrow": "Disabled"},
            "backup": {"backupRetentionDays": 7, "geoRedundantBackup": "Disabled"},
            "highAvailability": {"mode": "Disabled"},
            "network": {
                "publicNetworkAccess": "Disabled",
                "delegatedSubnetResourceId": subnet_id,
                "privateDnsZoneArmResourceId": zone_id,
            },
            "authConfig": {"activeDirectoryAuth": "Disabled", "passwordAuth": "Enabled"},
        },
    }


def db_tls_body() -> Body:
    return {"properties": {"value": "on", "source": "user-override"}}


def db_database_body() -> Body:
    return {"properties": {"charset": "UTF8", "collation": "en_US.utf8"}}


def database_url(fqdn: str, password: str) -> str:
    """What the service's DATABASE_URL gets: TLS required from the client side too."""
    return f"postgresql://{DB_ADMIN}:{password}@{fqdn}:5432/{DB_NAME}?sslmode=require"


def extension_script(d: Deployment, tls: tuple[str, str]) -> str:
    """The secrets extension's script: the secrets (token, database URL, registry login, certificate),
    then, on an instance past its first boot, the container's update to the image and settings."""
    update = cloudinit.update_script(d.image, d.port, d.env, caddyfile=d.caddyfile, model=d.model)
    return cloudinit.secrets_script(d.env, d.registry, tls=tls, then=update)


def extension_tag(d: Deployment, tls: tuple[str, str]) -> str:
    """forceUpdateTag: changes when anything the script carries changes (secrets by their salted
    fingerprints, the rest by the config fingerprint), so an unchanged re-deploy runs nothing."""
    parts = (
        cloudinit.secrets_digest(d.name, d.env),
        cloudinit.registry_digest(d.name, d.registry),
        cloudinit.secrets_digest(d.name, {"ACCESS_TOKEN": tls[0] + tls[1]}),
        cloudinit.config_digest(d.image, d.port, d.env, caddyfile=d.caddyfile, model=d.model),
    )
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def vmss_body(
    d: Deployment,
    *,
    subnet_id: str,
    pool_id: str,
    nsg_id: str,
    ssh_key: str,
    custom_data_b64: str,
    capacity: int,
    tls: tuple[str, str],
) -> Body:
    """The scale set: Flexible orchestration, one fault domain (spreading across racks with MAX 10 is
    Azure's to do), the single VM's OS profile and disk, NICs in the instances' subnet behind the load
    balancer, the health and secrets extensions, automatic repairs and rolling upgrades on health."""
    tag = extension_tag(d, tls)
    return {
        "location": d.region,
        "tags": {**d.tags, TLS_TAG: d.cert, MODEL_TAG: tag},
        "sku": {"name": d.size, "tier": "Standard", "capacity": capacity},
        "properties": {
            "orchestrationMode": "Flexible",
            "platformFaultDomainCount": 1,
            "singlePlacementGroup": False,
            "upgradePolicy": {
                "mode": "Rolling",
                "rollingUpgradePolicy": {
                    "maxBatchInstancePercent": 10,  # at least one instance: up to 10, one at a time
                    "maxUnhealthyInstancePercent": 50,
                    "maxUnhealthyUpgradedInstancePercent": 0,  # stop at the first upgraded one not healthy
                    "pauseTimeBetweenBatches": "PT30S",
                    "prioritizeUnhealthyInstances": True,
                },
            },
            "automaticRepairsPolicy": {
                "enabled": True,
                "gracePeriod": REPAIR_GRACE,
                "repairAction": "Replace",
            },
            "virtualMachineProfile": {
                "storageProfile": {
                    "imageReference": dict(UBUNTU_2404),
                    "osDisk": os_disk(d),
                },
                "osProfile": {
                    "computerNamePrefix": d.name[:15],
                    "adminUsername": ADMIN_USER,
                    "customData": custom_data_b64,
                    "linuxConfiguration": linux_configuration(ssh_key),
                },
                "networkProfile": {
                    "networkApiVersion": "2020-11-01",  # what Flexible orchestration requires
                    "networkInterfaceConfigurations": [
                        {
                            "name": "nic",
                            "properties": {
                                "primary": True,
                                "deleteOption": "Delete",
                                "networkSecurityGroup": {"id": nsg_id},
                                "ipConfigurations": [
                                    {
                                        "name": "ipconfig1",
                                        "properties": {
                                            "primary": True,
                                            "subnet": {"id": subnet_id},
                                            "loadBalancerBackendAddressPools": [{"id": pool_id}],
                                        },
                                    }
                                ],
                            },
                        }
                    ],
                },
                "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
                "extensionProfile": {
                    "extensions": [
                        {
                            "name": HEALTH_EXTENSION,
                            "properties": {
                                "publisher": "Microsoft.ManagedServices",
                                "type": "ApplicationHealthLinux",
                                "typeHandlerVersion": "1.0",  # binary states: 200 healthy, else not
                                "autoUpgradeMinorVersion": True,
                                "settings": {
                                    "protocol": "https",
                                    "port": d.port,
                                    "requestPath": "/api/health",
                                },
                            },
                        },
                        {
                            "name": SECRETS_EXTENSION,
                            "properties": {
                                "publisher": "Microsoft.Azure.Extensions",
                                "type": "CustomScript",
                                "typeHandlerVersion": "2.1",
                                "autoUpgradeMinorVersion": True,
                                "forceUpdateTag": tag,
                                "protectedSettings": {
                                    "script": base64.b64encode(extension_script(d, tls).encode()).decode()
                                },
                            },
                        },
                    ]
                },
            },
        },
    }


def autoscale_body(d: Deployment, vmss_id: str) -> Body:
    """Azure Monitor autoscale on the scale set's average CPU: one more instance above SCALE_OUT_CPU over
    5 minutes, one fewer below SCALE_IN_CPU over 10, never outside MIN..MAX. The cool-downs are long
    because a new instance needs minutes (image pull, model load) before it takes any load."""
    low, high = d.instances

    def rule(operator: str, threshold: int, window: str, direction: str, cooldown: str) -> Body:
        return {
            "metricTrigger": {
                "metricName": "Percentage CPU",
                "metricNamespace": "microsoft.compute/virtualmachinescalesets",
                "metricResourceUri": vmss_id,
                "timeGrain": "PT1M",
                "statistic": "Average",
                "timeWindow": window,
                "timeAggregation": "Average",
                "operator": operator,
                "threshold": threshold,
            },
            "scaleAction": {
                "direction": direction,
                "type": "ChangeCount",
                "value": "1",
                "cooldown": cooldown,
            },
        }

    return {
        "location": d.region,
        "tags": d.tags,
        "properties": {
            "name": d.autoscale,
            "enabled": True,
            "targetResourceUri": vmss_id,
            "profiles": [
                {
                    "name": "cpu",
                    "capacity": {"minimum": str(low), "maximum": str(high), "default": str(low)},
                    "rules": [
                        rule("GreaterThan", SCALE_OUT_CPU, "PT5M", "Increase", "PT10M"),
                        rule("LessThan", SCALE_IN_CPU, "PT10M", "Decrease", "PT15M"),
                    ],
                }
            ],
        },
    }
