"""Whether the subscription may run a size in a region, asked of Azure before anything billed exists.

Azure refuses a size it does not offer (SkuNotAvailable) or one over the vCPU quota only at the VM or
scale-set PUT, after the network, the public IP and the NIC (for a scale set also the NAT gateway, the
load balancer and the PostgreSQL server) were created and started to bill. So a deploy asks first:

- the resource SKUs of the region (`resource_skus.list`, filtered by location): is the size offered to
  this subscription there, unrestricted (a `Location` restriction, e.g. NotAvailableForSubscription
  or QuotaId, makes it unusable there; a `Zone` one only some zones), how many vCPUs, which family;
- the compute usages of the region (`usage.list`): per family (`standardBSFamily`) and in all
  (`cores`, "Total Regional vCPUs"), the vCPUs in use and the limit.

The new vCPUs are the VM's (a scale set: its maximum instances, which autoscale may reach), less what
an existing deployment already holds (Azure counts those in the usage already, allocated or not): a
re-deploy of the same size needs nothing more, a size change only the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from infra.azure.credentials import AzureClients
from infra.azure.errors import SUGGESTED_SIZES, AzureActionError, capacity_refusal

REGIONAL = "cores"  # the usage name of the region's total vCPUs


@dataclass(frozen=True)
class Offer:
    """A VM size as the region's SKU list describes it to this subscription."""

    name: str
    family: str
    vcpus: int
    restriction: str = ""  # why it cannot be used here (the restriction's reasonCode); "" if it can


@dataclass(frozen=True)
class Usage:
    """vCPUs in use and the limit, for one family or the region (`cores`)."""

    name: str
    current: int
    limit: int
    label: str = ""

    @property
    def free(self) -> int:
        return self.limit - self.current


def _text(value: object) -> str:
    """An SDK enum member (a str subclass whose str() is its qualified name) or a string, as sent."""
    return str(getattr(value, "value", value) or "")


def offers(clients: AzureClients, region: str) -> dict[str, Offer]:
    """The VM sizes the region lists for this subscription, by lower-case name."""
    found: dict[str, Offer] = {}
    for sku in clients.compute.resource_skus.list(filter=f"location eq '{region}'"):
        if sku.resource_type != "virtualMachines" or not sku.name:
            continue
        caps = {str(c.name): str(c.value) for c in sku.capabilities or [] if c.name}
        try:
            vcpus = int(caps.get("vCPUs", "0"))
        except ValueError:
            vcpus = 0
        why = ""
        for r in sku.restrictions or []:
            if _text(r.type).lower() == "location" and (
                not r.values_property or region.lower() in (v.lower() for v in r.values_property)
            ):
                why = _text(r.reason_code) or "restricted"
        found[sku.name.lower()] = Offer(sku.name, str(sku.family or ""), vcpus, why)
    return found


def usages(clients: AzureClients, region: str) -> dict[str, Usage]:
    """The region's compute usages (vCPU families and `cores`), by lower-case name."""
    found: dict[str, Usage] = {}
    for u in clients.compute.usage.list(region):
        name = str(u.name.value or "") if u.name else ""
        if name:
            label = str(u.name.localized_value or name)
            found[name.lower()] = Usage(name, int(u.current_value), int(u.limit), label)
    return found


@dataclass(frozen=True)
class Held:
    """What an existing deployment already runs: `count` instances of `size` (counted in the usage)."""

    size: str = ""
    count: int = 0


def shortfall(
    offer: Offer, count: int, held: Held, known: dict[str, Offer], quota: dict[str, Usage]
) -> list[tuple[Usage, int]]:
    """The quotas `count` instances of `offer` would exceed, with the vCPUs each would need in all."""
    old = known.get(held.size.lower()) if held.size and held.count else None
    old_vcpus = old.vcpus * held.count if old else 0
    new_vcpus = offer.vcpus * count
    over = []
    family = quota.get(offer.family.lower()) if offer.family else None
    if family is not None:
        same = old is not None and old.family.lower() == offer.family.lower()
        need = new_vcpus - (old_vcpus if same else 0)
        if need > 0 and need > family.free:
            over.append((family, need))
    regional = quota.get(REGIONAL)
    if regional is not None:
        need = new_vcpus - old_vcpus
        if need > 0 and need > regional.free:
            over.append((regional, need))
    return over


def check(
    clients: AzureClients,
    region: str,
    size: str,
    count: int = 1,
    held: Held | None = None,
    suitable: Callable[[str], bool] = lambda _: True,
) -> None:
    """Refuse (AzureActionError) `count` instances of `size` in `region` that Azure would refuse: a size
    not offered there, or restricted, or over the family's or the region's vCPU quota. The refusal names
    the sizes that would fit (offered, unrestricted, within quota, `suitable`: e.g. the model fits)."""
    held = held or Held()
    known = offers(clients, region)
    offer = known.get(size.lower())
    quota: dict[str, Usage] | None = None
    if offer is not None and not offer.restriction:
        quota = usages(clients, region)
        over = shortfall(offer, count, held, known, quota)
        if not over:
            return
    else:
        over = []
    if quota is None:
        quota = usages(clients, region)
    fitting = [
        o.name
        for o in known.values()
        if o.name.lower() != size.lower()
        and not o.restriction
        and o.vcpus > 0
        and not shortfall(o, count, held, known, quota)
        and suitable(o.name)
    ]
    raise AzureActionError(
        capacity_refusal(
            size=size,
            region=region,
            count=count,
            vcpus=offer.vcpus if offer else 0,
            restriction=None if offer is None else offer.restriction,
            over=[(u.label or u.name, u.name == REGIONAL, u.current, u.limit, need) for u, need in over],
            fitting=order(fitting, known),
        )
    )


def order(names: list[str], known: dict[str, Offer]) -> list[str]:
    """The project's preferred sizes first (errors.SUGGESTED_SIZES), then the smallest."""
    rank = {s.lower(): i for i, s in enumerate(SUGGESTED_SIZES)}
    preferred = sorted((n for n in names if n.lower() in rank), key=lambda n: rank[n.lower()])
    rest = sorted(
        (n for n in names if n.lower() not in rank), key=lambda n: (known[n.lower()].vcpus, n.lower())
    )
    return preferred + rest
