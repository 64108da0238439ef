"""Does a model fit a machine? The catalog's memory figure against a VM size's (or this machine's) RAM.

A model that does not fit in RAM does not fail cleanly: it loads into swap (cloud-init makes a 4 GiB
swap file on the VM) and then answers at a token every few seconds, or the kernel kills it. So swap
never counts here, and a deploy that would not fit is refused before anything is created, with sizes,
precisions and models that would fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from infra.plan import HOURS_PER_MONTH, SIZE_NAMES, VM_MEMORY_GIB, VM_PRICE_PER_HOUR
from service.catalog import CATALOG, CatalogEntry, lookup
from service.config import DEFAULT_MODEL_ID, Settings

# Ubuntu, the VM agent, Docker, Caddy and gunicorn itself, measured at about 0.7 GiB on a B2s; rounded up.
SYSTEM_OVERHEAD_GIB = 1.0
# From the most bytes per weight to the fewest: a "smaller precision" is one further along.
BYTES_ORDER = ("float32", "bfloat16", "int8", "int4")


@dataclass(frozen=True)
class Fit:
    """The verdict for one model at one precision on one machine; `message` says it in a sentence."""

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
    """Sizes from the plan's table with room for `need_gb`, cheapest first."""
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


def default_precision() -> str:
    """The service's own default (DTYPE), which a deploy without --precision runs and checks."""
    return Settings.__dataclass_fields__["dtype"].default


def local_ram_gib() -> float:
    """This machine's physical memory in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def check_local(model: str, precision: str, ram_gib: float | None = None) -> str | None:
    """A warning when `model` at `precision` would not fit this machine's RAM (None when it fits or is
    unknown); for run-local, which warns and goes on, since the user knows what else is running."""
    entry = lookup(model or DEFAULT_MODEL_ID)
    if entry is None:
        return None
    ram = local_ram_gib() if ram_gib is None else ram_gib
    need = entry.memory_gb(precision)
    if need <= ram - SYSTEM_OVERHEAD_GIB:
        return None
    return (
        f"{entry.hub_id} at {precision} needs about {need} GB of memory and this machine has "
        f"{ram:.1f} GiB: it may swap and crawl, or be killed. Consider --env DTYPE=int8 "
        f"({entry.memory_gb('int8')} GB) or a smaller model."
    )
