"""The compiled quantized-product kernels (kernels.cpp): built once per machine, then loaded from a cache.

PyTorch has no supported eager kernel that multiplies one float row by int8 or int4 weights near
memory speed on an AVX2 CPU (its int8 weight-only kernel is scalar for float32 rows, its int4 one
reads 6 GB/s, and fbgemm's int8 path rests on the deprecated `torch.ao` quantized tensors). So the
products a decode step needs are a small C++ file compiled with `torch.utils.cpp_extension` the
first time it is needed (about a minute with g++) into a cache folder; later starts load the built
library in milliseconds. The image builds it once at build time (see docs/docker.md).

Without a compiler, or on a CPU without AVX2 and FMA, `available()` is False and the layers use
PyTorch's own (slower) kernels; which ones is logged once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

NAME = "qwenbox_kernels"
SOURCE = Path(__file__).with_name("kernels.cpp")
DEFAULT_DIR = Path("~/.cache/qwen-box/kernels").expanduser()
_directory: Path = DEFAULT_DIR


def configure(directory: str | os.PathLike[str] | None) -> None:
    """Where the built library is kept (and looked for); None or "" keeps the default under ~/.cache.
    Call before the first product; the folder is created when needed. Each source's build goes in a
    subfolder named by its stamp, so checkouts of different kernels (git worktrees, an upgrade) share
    one cache folder without rebuilding over each other's library."""
    global _directory
    _directory = Path(directory).expanduser() if directory else DEFAULT_DIR
    library.cache_clear()


def cpu_supported() -> bool:
    """Whether this CPU runs the kernels: they use AVX2 and FMA (every x86 CPU since 2013-2015)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none): read once, for the
    choices that depend on instructions torch's capability level does not name (VNNI, AVX-512 BF16)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


# -mf16c: the int8 weights' block scales are float16 (every AVX2 CPU has F16C); -ffp-contract=off: no
# multiply and add fused where the source did not write an FMA, so that tiles that must agree to the
# bit (a row's result alone and in a batch) round alike
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]


def fingerprint() -> str:
    """What the built library depends on: the source, the flags and the torch it was built against.
    A library whose stamp differs is built again."""
    text = "\n".join([SOURCE.read_text(), " ".join(FLAGS), torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def library() -> ModuleType | None:
    """The built kernels: a library already in the cache folder with this source's stamp is loaded
    as is (no compiler, headers or ninja needed, as in the image); otherwise they are compiled first.
    None if they cannot be had here (no AVX2, no compiler), after logging why once."""
    if not cpu_supported():
        log.info(
            "quantized kernels: CPU capability %s lacks AVX2, using PyTorch's kernels",
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    folder = _directory / fingerprint()[:16]
    built, stamp = folder / f"{NAME}.so", folder / f"{NAME}.sha256"
    try:
        if built.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint():
            return _import(built)
        from torch.utils import cpp_extension

        folder.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load_inline(
            name=NAME,
            cpp_sources=[SOURCE.read_text()],
            functions=[
                "int8_matmul",
                "int4_matmul",
                "int8_prompt_matmul",
                "decode_add_rms_norm",
                "decode_silu_mul",
                "decode_attention",
            ],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
        stamp.write_text(fingerprint())
    except Exception as error:  # no compiler, no headers, a failed build: run without them
        log.warning("quantized kernels unavailable (%s); using PyTorch's slower kernels", error)
        return None
    return module


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def available() -> bool:
    """Whether the compiled kernels can be used on this machine (building them if needed)."""
    return library() is not None


def build(directory: str | None = None) -> Path:
    """Compile the kernels into `directory` (or the configured folder) and return it: what the image
    runs once at build time, `python -m service.inference.kernels [DIR]`."""
    configure(directory)
    if library() is None:
        raise RuntimeError("the quantized kernels could not be built here (see the log above)")
    return _directory


if __name__ == "__main__":  # pragma: no cover - a build step
    import sys

    logging.basicConfig(level=logging.INFO)
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
