"""Azure VM sizes: what each costs and how much memory it has, and whether a model fits one.

The tables are the deployment's only knowledge of sizes: the plan's cost estimate (infra/azure/plan.py)
reads the prices, and the fit check below compares the catalog's memory figure (service/catalog.py)
against a size's RAM, so a deploy that could only run in swap is refused before anything is created,
with the sizes, precisions and models that would fit. A size missing from the tables is allowed but
neither priced nor checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.fit import BYTES_ORDER, SYSTEM_OVERHEAD_GIB
from service.catalog import CATALOG, CatalogEntry, lookup
from service.config import DEFAULT_MODEL_ID

DEFAULT_SIZE = "Standard_B2s"

# Pay-as-you-go Linux list prices in USD per hour (East US, late 2025). An estimate to show the order of
# magnitude before anything is created, not a quote: other regions, discounts and currency differ.
HOURS_PER_MONTH = 730
VM_PRICE_PER_HOUR = {
    "standard_b2s": 0.0416,
    "standard_b2ms": 0.0832,
    "standard_b4ms": 0.166,
    "standard_d2s_v5": 0.096,
    "standard_d4s_v5": 0.192,
    "standard_d2as_v5": 0.086,
    "standard_d4as_v5": 0.172,
}
# Memory of each size in GiB (Azure's size pages): what the model-fit check compares against.
VM_MEMORY_GIB = {
    "standard_b2s": 4,
    "standard_b2ms": 8,
    "standard_b4ms": 16,
    "standard_d2s_v5": 8,
    "standard_d4s_v5": 16,
    "standard_d2as_v5": 8,
    "standard_d4as_v5": 16,
}
SIZE_NAMES = {
    k.lower(): k
    for k in (
        "Standard_B2s",
        "Standard_B2ms",
        "Standard_B4ms",
        "Standard_D2s_v5",
        "Standard_D4s_v5",
        "Standard_D2as_v5",
        "Standard_D4as_v5",
    )
}
PUBLIC_IP_PER_HOUR = 0.005
# A scale set's other parts (East US pay-as-you-go list prices, late 2025; estimates, not quotes; the
# per-GB charges of the load balancer and NAT gateway and DNS queries come on top, with traffic):
LOAD_BALANCER_PER_HOUR = 0.025  # Standard, the first 5 rules (we have 2), plus $0.005 per GB processed
NAT_GATEWAY_PER_HOUR = 0.045  # plus $0.045 per GB processed
POSTGRES_B1MS_PER_HOUR = 0.017  # Flexible Server, Burstable B1ms compute
POSTGRES_STORAGE_GB_MONTH = 0.115  # its provisioned storage; backups up to that size are free
PRIVATE_DNS_ZONE_PER_MONTH = 0.50  # plus $0.40 per million queries
STANDARD_SSD_PER_MONTH = [(32, 2.40), (64, 4.80), (128, 9.60), (256, 19.20), (512, 38.40), (1024, 76.80)]


def monthly_price(size: str) -> float | None:
    """The size's list price for a month of running, or None for a size not in the table."""
    hourly = VM_PRICE_PER_HOUR.get(size.lower())
    return round(hourly * HOURS_PER_MONTH, 2) if hourly else None


def disk_price(disk_gb: int) -> float:
    """Standard SSD bills by tier: the smallest tier that holds the disk."""
    for size, price in STANDARD_SSD_PER_MONTH:
        if disk_gb <= size:
            return price
    return STANDARD_SSD_PER_MONTH[-1][1]


@dataclass(frozen=True)
class Fit:
    """The verdict for one model at one precision on one VM size; `message` says it in a sentence."""

    model: str
    precision: str
    entry: CatalogEntry | None
    usable_gib: float | None
    fits: bool
    message: str

    @property
    def need_gb(self) -> float | None:
        return self.entry.memory_gb(self.precision) if self.entry else None


def usable_gib(size: str) -> float | None:
    """RAM a size leaves for the model, or None for a size not in the table."""
    ram = VM_MEMORY_GIB.get(size.lower())
    return None if ram is None else ram - SYSTEM_OVERHEAD_GIB


def _monthly(size: str) -> str:
    hourly = VM_PRICE_PER_HOUR.get(size.lower())
    return f", about ${hourly * HOURS_PER_MONTH:.0f} a month" if hourly else ""


def sizes_that_fit(need_gb: float) -> list[str]:
    """Sizes from the table with room for `need_gb`, cheapest first."""
    fitting = [k for k in VM_MEMORY_GIB if VM_MEMORY_GIB[k] - SYSTEM_OVERHEAD_GIB >= need_gb]
    return [SIZE_NAMES[k] for k in sorted(fitting, key=lambda k: (VM_PRICE_PER_HOUR.get(k, 1e9), k))]


def check_vm(model: str, precision: str, size: str) -> Fit:
    """Whether `model` at `precision` fits a VM of `size`; when not, what would."""
    model = model or DEFAULT_MODEL_ID
    entry = lookup(model)
    room = usable_gib(size)
    if entry is None:
        return Fit(
            model,
            precision,
            None,
            room,
            True,
            f"{model} is not in the catalog (service/catalog.py), so its memory is unknown: not "
            f"checked against {size}. If it does not fit, it loads into swap and crawls.",
        )
    if room is None:
        return Fit(
            model,
            precision,
            entry,
            None,
            True,
            f"the memory of {size} is not in the size table: not checked whether {model} "
            f"({entry.memory_gb(precision)} GB at {precision}) fits.",
        )
    need = entry.memory_gb(precision)
    if need <= room:
        return Fit(
            model,
            precision,
            entry,
            room,
            True,
            f"{model} at {precision} needs about {need} GB; {size} leaves {room:g} GiB.",
        )
    lines = [
        f"{model} at {precision} needs about {need} GB of memory, but {size} has "
        f"{VM_MEMORY_GIB[size.lower()]} GiB, {room:g} GiB after the system's "
        f"{SYSTEM_OVERHEAD_GIB:g} GiB (swap does not count: a model in swap answers a token every "
        "few seconds). Any of these fits:"
    ]
    bigger = sizes_that_fit(need)
    if bigger:
        lines.append(f"  --size {bigger[0]} ({VM_MEMORY_GIB[bigger[0].lower()]} GiB{_monthly(bigger[0])})")
    for other in BYTES_ORDER[BYTES_ORDER.index(precision) + 1 :]:
        if entry.memory_gb(other) <= room:
            lines.append(f"  --precision {other} ({entry.memory_gb(other)} GB)")
    smaller = [e for e in CATALOG if e.memory_gb(precision) <= room and e.hub_id != entry.hub_id]
    if smaller:
        best = max(smaller, key=lambda e: e.params_b)
        lines.append(f"  --model {best.hub_id} ({best.memory_gb(precision)} GB at {precision})")
    return Fit(model, precision, entry, room, False, "\n".join(lines))
