"""Take out of the image's virtualenv what the service never loads: the one list of what goes, and why.

The image with the default model should stay under 2.5 GB (issue 13): its size is the Azure VM's pull
time. The wheels carry much the running service never reads: C++ headers, test suites, type stubs,
symbol tables, the bytecode of modules nothing imports, installers. The Dockerfile's deps stage runs
this once, after every package is installed and the kernels are built, with the image's own Python and
binutils' `strip` on PATH:

    python infra/image_prune.py qwen2 llama        (the architectures whose code paths are traced)

and, in the model stage, `python infra/image_prune.py --model-folder DIR` on the downloaded model.

Every entry below says why the service can do without it; tests/test_image.py builds the image, checks
the service's modules still import with their bytecode, and chats with it. What is *kept* on purpose:
the source of every module (a mounted model of another architecture, or a code path not traced here,
still imports: Python compiles it in memory, a fraction of a second), licence files in *.dist-info,
torch.testing (torch itself imports parts of it), and the libraries bundled in `*.libs` folders (their
ELF layout was rewritten by auditwheel, which `strip` is not safe on).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

# Paths relative to site-packages (glob patterns), each deleted with everything under it.
DELETE: dict[str, str] = {
    "torch/include": "C++ headers, for compiling extensions: the kernels are compiled before this runs",
    "torch/share": "CMake files for C++ projects that link libtorch",
    "torch/test": "C++ test binaries of torch's own suite",
    "torch/bin/*": "C++ test binaries, protoc and test models (torch_shm_manager stays: KEEP)",
    "torch/lib/libtorchbind_test.so": "loaded only by torch's own tests (torch.ops.load_library)",
    "torch/lib/libjitbackend_test.so": "loaded only by torch's own tests",
    "torch/lib/libbackend_with_compiler.so": "loaded only by torch's own tests",
    "torch/lib/libaoti_custom_ops.so": "loaded only by torch's own tests",
    "*/**/tests": "packages' own test suites (sympy 33 MB, numpy 15 MB, networkx 8 MB ...): only their "
    "test runners import them",
    "**/*.pyi": "type stubs, read by type checkers, never by the interpreter",
}

# Exceptions to DELETE.
KEEP: dict[str, str] = {
    "torch/bin/torch_shm_manager": "torch.multiprocessing's shared-memory manager (DataLoader may start it)",
}

# Distributions uninstalled (with pip, last, so pip goes too).
UNINSTALL: dict[str, str] = {
    "setuptools": "builds packages; at run time only torch.utils.cpp_extension imports it, to compile "
    "the kernels, and the image ships them compiled (and has no compiler)",
    "pip": "installs packages: the running image installs none",
}

# Files of a downloaded model folder that the service never reads, each dropped only when the file
# named beside it is there (the model stage runs `python image_prune.py --model-folder DIR` before
# quantizing, so the checkpoint never copies them).
MODEL_FILES: dict[str, tuple[str, str]] = {
    "vocab.json": ("tokenizer.json", "the slow tokenizer's vocabulary: the fast tokenizer's file has it"),
    "merges.txt": ("tokenizer.json", "the slow tokenizer's merges: the fast tokenizer's file has them"),
}

# Packages whose bytecode is kept only for the modules a traced start and generation import.
BYTECODE_OF_IMPORTED_ONLY: dict[str, str] = {
    "torch": "torch ships bytecode for its compiler stack, distributed, ONNX export ...: 28 MB unused",
    "sympy": "torch imports a part of sympy; the rest of its bytecode (11 MB) is never read",
    "transformers": "code for hundreds of architectures (about 60 MB of bytecode); the service "
    "imports a handful",
}

# Shared libraries whose symbol tables go (`strip --strip-unneeded` keeps what the dynamic loader
# needs): libtorch_cpu.so alone loses about 100 MB; the Rust and C extensions about 16 MB together.
STRIP: dict[str, str] = {
    "torch/lib/*.so*": "torch's libraries (libgomp.so.1 included)",
    "**/*.so": "extension modules (tokenizers, hf_xet, brotli, regex, yaml, safetensors, numpy ...)",
}


def imported_modules(architectures: list[str]) -> set[str]:
    """Source files of the modules the service's stack imports: the Auto classes and processors, these
    architectures' model code, and a short generation with a tiny random model of the first one (a
    forward pass and generate() import much of torch lazily)."""
    import torch
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoProcessor,
        AutoTokenizer,
    )

    for name in architectures:
        AutoConfig.for_model(name)
        for kind in ("modeling", "tokenization"):
            try:
                importlib.import_module(f"transformers.models.{name}.{kind}_{name}")
            except ModuleNotFoundError:  # an architecture with no tokenizer of its own
                pass
    config = AutoConfig.for_model(
        architectures[0],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.inference_mode():
        ids = torch.tensor([[1, 2, 3]])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    files = (getattr(m, "__file__", None) for m in list(sys.modules.values()))
    return {str(Path(f).resolve()) for f in files if f}


def size(path: Path) -> int:
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def in_metadata(path: Path, root: Path) -> bool:
    """Under a *.dist-info folder (licences and records stay) or a `*.libs` folder (auditwheel's)."""
    return any(p.endswith((".dist-info", ".libs")) for p in path.relative_to(root).parts)


def delete(root: Path) -> int:
    freed = 0
    for pattern in DELETE:
        for path in sorted(root.glob(pattern), key=lambda p: len(p.parts)):
            relative = path.relative_to(root).as_posix()
            if not path.exists() or in_metadata(path, root) or relative in KEEP:
                continue
            if pattern.endswith("tests") and not path.is_dir():
                continue
            freed += size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return freed


def prune_bytecode(root: Path, keep: set[str]) -> int:
    """Delete each __pycache__/*.pyc under BYTECODE_OF_IMPORTED_ONLY whose module is not in `keep`."""
    freed = 0
    for package in BYTECODE_OF_IMPORTED_ONLY:
        for pyc in (root / package).rglob("*.pyc"):
            if pyc.parent.name != "__pycache__":
                continue
            source = pyc.parent.parent / (pyc.name.split(".", 1)[0] + ".py")
            if str(source.resolve()) not in keep:
                freed += pyc.stat().st_size
                pyc.unlink()
    return freed


def strip(root: Path) -> int:
    """Strip each library in STRIP; one strip refuses (not ELF, say) stays as it was, and is named."""
    exe = shutil.which("strip")
    if exe is None:
        raise SystemExit("image_prune: binutils' strip is not on PATH (the Dockerfile installs it)")
    files = {p for pattern in STRIP for p in root.glob(pattern) if p.is_file() and not p.is_symlink()}
    freed = 0
    for path in sorted(p for p in files if not in_metadata(p, root)):
        before = path.stat().st_size
        done = subprocess.run([exe, "--strip-unneeded", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"image_prune: left {path.relative_to(root)} unstripped: {done.stderr.strip()}")
        freed += before - path.stat().st_size
    return freed


def uninstall() -> int:
    import importlib.metadata as md

    freed = 0
    for name in UNINSTALL:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        freed += sum(size(Path(str(dist.locate_file(f)))) for f in dist.files or [])
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", *UNINSTALL], check=True)
    return freed


def prune_model_folder(folder: Path) -> int:
    freed = 0
    for name, (instead, _why) in MODEL_FILES.items():
        if (folder / name).is_file() and (folder / instead).is_file():
            freed += size(folder / name)
            (folder / name).unlink()
    return freed


def site_packages() -> Path:
    import transformers

    return Path(transformers.__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if argv[:1] == ["--model-folder"] and len(argv) == 2:
        print(f"image_prune: freed {prune_model_folder(Path(argv[1])) / 1e6:.1f} MB of {argv[1]}")
        return 0
    if not argv or argv[0].startswith("-"):
        raise SystemExit(
            "usage: python image_prune.py ARCHITECTURE [...]  (the virtualenv; e.g. qwen2 llama)\n"
            "       python image_prune.py --model-folder DIR  (a downloaded model folder)"
        )
    root = site_packages()
    keep = imported_modules(argv)
    freed: dict[str, int] = {
        "deleted": delete(root),
        "bytecode": prune_bytecode(root, keep),
        "stripped": strip(root),
    }
    freed["uninstalled"] = uninstall()
    print(
        "image_prune: freed "
        + ", ".join(f"{what} {n / 1e6:.0f} MB" for what, n in freed.items())
        + f" (total {sum(freed.values()) / 1e6:.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
