"""Does a model fit a machine's memory? What run-local warns about and a VM size is checked against.

A model that does not fit in RAM does not fail cleanly: it loads into swap (cloud-init makes a 4 GiB
swap file on the VM) and then answers at a token every few seconds, or the kernel kills it. So swap
never counts. Here: what every machine costs the system, the order of precisions, and the check of this
machine for run-local, which warns and goes on (the user knows what else runs); the VM sizes and their
check, which refuses, are in infra/azure/sizes.py.
"""

from __future__ import annotations

import os

from service.catalog import lookup
from service.config import DEFAULT_MODEL_ID, Settings

# Ubuntu, the VM agent, Docker, Caddy and gunicorn itself, measured at about 0.7 GiB on a B2s; rounded up.
SYSTEM_OVERHEAD_GIB = 1.0
# From the most bytes per weight to the fewest: a "smaller precision" is one further along.
BYTES_ORDER = ("float32", "bfloat16", "int8", "int4")


def default_precision() -> str:
    """The service's own default (DTYPE), which a deploy without --precision runs and checks."""
    return str(Settings.__dataclass_fields__["dtype"].default)


def local_ram_gib() -> float:
    """This machine's physical memory in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def check_local(model: str, precision: str, ram_gib: float | None = None) -> str | None:
    """A warning when `model` at `precision` would not fit this machine's RAM (None when it fits or is
    unknown)."""
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
