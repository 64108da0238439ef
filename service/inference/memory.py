"""Memory: how much the weights of a model will take, how much this machine allows, and handing
freed memory back to the system.

The model manager (`service.models`) uses the first two to decide whether a second model can load
beside the current one; the engine and the loader call `return_freed_memory` after large frees.
No torch here: these are read from files, the catalog and the system.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

from ..catalog import BYTES_PER_PARAM, lookup


def return_freed_memory() -> None:
    """Hand memory freed by Python back to the system now (glibc keeps freed arenas otherwise):
    on a small VM the peak is the budget, and the next model needs the room."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def weights_bytes(source: str, dtype: str) -> int | None:
    """Memory the weights will take at `dtype`: from the files of a local folder (rescaled from the
    precision they are stored in), else from the catalog's parameter count; None if unknown."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
        if files:
            stored = "bfloat16"
            config = folder / "config.json"
            if config.exists():
                cfg = json.loads(config.read_text())
                stored = str(cfg.get("torch_dtype") or cfg.get("dtype") or stored)
            ratio = BYTES_PER_PARAM.get(dtype, 2.0) / BYTES_PER_PARAM.get(stored, 2.0)
            return int(sum(f.stat().st_size for f in files) * ratio)
    entry = lookup(source)
    return entry.weights_bytes(dtype) if entry and dtype in BYTES_PER_PARAM else None


def default_budget() -> int:
    """Bytes the loaded models may take together: 80% of this machine's (or container's) memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total * 0.8)
