"""What a start does before torch and Transformers are imported, so the model is ready sooner.

Load to ready (issue 13: ≤ 5 s from local disk) is mostly Python importing torch and Transformers,
which the engine's thread does before it can read a weight. What here shortens or overlaps that
imports no torch (the web layer calls `prepare` while building the app):

- `pause_gc()` / `resume_gc()`: no cyclic garbage collection while the modules import and the model
  loads (the collector's passes over the imported objects were a fifth of the start).
- `prefetch(source)`: torch's shared libraries and a pre-quantized checkpoint's weights file are
  read ahead into the page cache in a background thread (`posix_fadvise(WILLNEED)`: the kernel
  reads while Python imports), so from a cold disk they are in memory by the time `import torch`
  and `loading.map_safetensors` map them.
- `install_import_cache()`: `import transformers` reads the source of all of its ~560 model packages
  to find their `__all__` (`create_import_structure_from_path`: 0.6-0.9 s of a 2-core AVX2 EPYC, the
  same answer every start). The answer is kept in a file of the qwen-box cache folder, keyed by the
  Transformers version and every model file's size and mtime (any change: scanned again), and read
  back in a few milliseconds. The image writes it at build time (`python -m service.inference.startup`).
  It wraps one function of Transformers' import machinery as its module is loaded; should a release
  rename it, nothing is wrapped and Transformers scans as before.
  Likewise torch's config modules (`torch._inductor.config` and six more, which Transformers' model
  code imports through `torch._dynamo`): each tokenizes its own source for `@compile_ignored`
  comments as it is imported (`get_assignments_with_compile_ignored_comments`, 0.14 s of a start in
  the image); that answer is kept too, per source file, keyed by its path, size and mtime.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

CACHE_DIR = Path("~/.cache/qwen-box").expanduser()
_IMPORT_UTILS = "transformers.utils.import_utils"
_SCAN = "create_import_structure_from_path"
_TORCH_CONFIG = "torch.utils._config_module"
_IGNORED = "get_assignments_with_compile_ignored_comments"
_PREFETCH_CHUNK = 64 << 20


def prepare(source: str) -> None:
    """Everything here, for a start that will load `source` (a model folder or hub id); the loader
    calls `resume_gc()` when the model is loaded (or failed to)."""
    pause_gc()
    install_import_cache()
    prefetch(source)


# --- the cyclic garbage collector, paused while modules import ---------------------------------------

_gc_paused = False


def pause_gc() -> None:
    """No cyclic garbage collection until `resume_gc()`. Importing torch and Transformers creates
    about 600,000 objects that live as long as the process, and the collector went through all of
    them again at each of its six full passes: 1.5 s of a 7 s start on a 2-core AVX2 EPYC. Objects
    freed by reference counting (nearly all) still are; only cycles wait."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """The collector back on, with what the start built moved out of its sight (`gc.freeze`: those
    objects are never garbage, and each later full pass would walk them again)."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


# --- the weights, read ahead -------------------------------------------------------------------------


_prefetched: set[str] = set()


def prefetch(source: str) -> threading.Thread | None:
    """Start reading into the page cache, in the background (returns the thread): torch's shared
    libraries (about 450 MB, which `import torch` maps first and would otherwise fault in page by
    page from a cold disk), then `source`'s pre-quantized weights. None when `source` is not a
    local pre-quantized folder: a float model is read tensor by tensor as it is quantized, and
    reading 3 GB ahead would only crowd a small VM's memory. Once per source and process (a forked
    worker counts its parent's)."""
    folder = Path(source).expanduser()
    if str(folder) in _prefetched:  # already (`python -m service` starts it before gunicorn forks)
        return None
    try:
        manifest = json.loads((folder / "quantized.json").read_text())
        weights = folder / manifest["weights"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _prefetched.add(str(folder))
    paths = [*_torch_libraries(), weights]
    thread = threading.Thread(target=_read_ahead, args=(paths,), name="prefetch-weights", daemon=True)
    thread.start()
    return thread


def _torch_libraries() -> list[Path]:
    """torch's shared libraries, largest first, found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    libraries = [p for folder in spec.submodule_search_locations for p in Path(folder, "lib").glob("*.so*")]
    return sorted(libraries, key=lambda p: -p.stat().st_size)


def _read_ahead(paths: list[Path]) -> None:
    """The kernel reads each file into the page cache, in order, a chunk per call (`posix_fadvise`
    releases the GIL, so the imports go on meanwhile). A file that cannot be opened is skipped:
    loading will say what is wrong with it."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            for start in range(0, size, _PREFETCH_CHUNK):
                os.posix_fadvise(fd, start, min(_PREFETCH_CHUNK, size - start), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


# --- patched as they are imported --------------------------------------------------------------------


def install_import_cache(cache_dir: Path | None = None) -> bool:
    """From the next `import transformers` on, its scan of its model packages kept in `cache_dir`
    (`cached_scan`), and from the next `import torch` on, its config modules' scan of their comments
    (`cached_ignored`); False when both are imported already (too late) or this is installed already."""
    if any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        return False
    folder = cache_dir or CACHE_DIR
    patches: dict[str, Callable[[ModuleType], None]] = {
        _IMPORT_UTILS: lambda module: _wrap(module, _SCAN, lambda scan: cached_scan(scan, folder)),
        _TORCH_CONFIG: lambda module: _wrap(module, _IGNORED, lambda scan: cached_ignored(scan, folder)),
    }
    patches = {name: patch for name, patch in patches.items() if name not in sys.modules}
    if not patches:
        return False
    sys.meta_path.insert(0, _PatchOnImport(patches))
    return True


def _wrap(module: ModuleType, name: str, make: Callable[[Any], Any]) -> None:
    """`module.name` replaced by `make(module.name)`; nothing if a release no longer has it."""
    original = getattr(module, name, None)
    if callable(original):
        setattr(module, name, make(original))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when a module it patches is imported, it lets the other finders find it
    and patches the module once it has run (then forgets it; gone from `sys.meta_path` when done)."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]):
        self.patches = patches

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patch = self.patches.pop(fullname, None)
        if patch is None:
            return None
        if not self.patches:
            sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is not self and find is not None and (spec := find(fullname, path, target)):
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def cached_scan(scan: Callable[[str], dict], cache_dir: Path) -> Callable[[str], dict]:
    """`scan` (Transformers' `create_import_structure_from_path`), answered from a file for its
    `models` folder, the one every start scans whole; any other folder is passed through."""

    def wrapper(module_path: str) -> dict:
        folder = Path(module_path)
        if folder.name == "__init__.py":  # models/__init__.py asks for its folder by its own file
            folder = folder.parent
        if folder.name != "models" or folder.parent.name != "transformers" or not folder.is_dir():
            return scan(module_path)
        key = _fingerprint(folder)
        # one file per installation: two environments of one version would otherwise overwrite
        # each other's answer at every start of either
        where = hashlib.sha256(key["path"].encode()).hexdigest()[:12]
        file = cache_dir / f"transformers-imports-{key['version']}-{where}.json"
        try:
            stored = json.loads(file.read_text())
            if stored["key"] == key:
                return _decode(stored["structure"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        structure = scan(str(folder))
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "structure": _encode(structure)}))
            os.replace(tmp, file)
        except OSError as e:  # a read-only home: scanned every start, as without this module
            log.debug("Transformers' import structure not kept in %s: %s", file, e)
        return structure

    cached = functools.lru_cache(wrapper)  # as Transformers' own: each folder once per process
    cached.scan = scan  # type: ignore[attr-defined]  # Transformers' own, for comparing
    return cached


def cached_ignored(
    scan: Callable[[ModuleType], set[str]], cache_dir: Path
) -> Callable[[ModuleType], set[str]]:
    """`scan` (torch's `get_assignments_with_compile_ignored_comments`: the names a config module marks
    `@compile_ignored`, found by tokenizing its source), answered from `cache_dir`'s
    `torch-config-ignored.json` for a source file of the same path, size and mtime; else scanned (and
    kept). A module without a file, or one whose scan raises, is torch's own business."""
    file = cache_dir / "torch-config-ignored.json"
    kept: dict[str, Any] | None = None

    def wrapper(module: ModuleType) -> set[str]:
        nonlocal kept
        source = getattr(module, "__file__", None)
        try:
            st = os.stat(source) if isinstance(source, str) else None
        except OSError:
            st = None
        if st is None or not isinstance(source, str):
            return scan(module)
        key = [st.st_size, st.st_mtime_ns]
        if kept is None:
            try:
                stored = json.loads(file.read_text())
            except (OSError, ValueError):
                stored = None
            kept = stored if isinstance(stored, dict) else {}
        entry = kept.get(source)
        if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("names"), list):
            return set(entry["names"])
        names = scan(module)
        kept[source] = {"key": key, "names": sorted(names)}
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(kept))
            os.replace(tmp, file)
        except OSError as e:  # a read-only home: scanned every start, as without this module
            log.debug("torch's config comments not kept in %s: %s", file, e)
        return names

    wrapper.scan = scan  # type: ignore[attr-defined]  # torch's own, for comparing
    return wrapper


def _fingerprint(folder: Path) -> dict[str, Any]:
    """What the scan's answer depends on: the Transformers version and every file under `folder`
    (names, sizes, mtimes: an edited or added model file changes it). About 30 ms for 3,400 files."""
    version = "unknown"
    init = folder.parent / "__init__.py"
    try:
        for line in init.read_text().splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
                break
    except OSError:
        pass
    count, total, latest = 0, 0, 0
    for base, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                st = os.stat(os.path.join(base, name))
                count, total, latest = count + 1, total + st.st_size, max(latest, st.st_mtime_ns)
    return {"version": version, "path": str(folder), "files": count, "bytes": total, "mtime_ns": latest}


def _encode(structure: dict) -> list:
    """JSON for the scan's answer: its keys are folder names (a nested answer) or frozensets of
    backends (module name → set of exported names)."""
    out: list = []
    for key, value in structure.items():
        if isinstance(key, str):
            out.append(["dir", key, _encode(value)])
        else:
            out.append(["backends", sorted(key), {m: sorted(names) for m, names in value.items()}])
    return out


def _decode(encoded: list) -> dict:
    out: dict = {}
    for kind, key, value in encoded:
        if kind == "dir":
            out[key] = _decode(value)
        else:
            out[frozenset(key)] = {m: set(names) for m, names in value.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m service.inference.startup`: write the import-structure file now (the image does, at
    build time, so no start has to)."""
    cache_dir = Path(argv[0]) if argv else CACHE_DIR
    install_import_cache(cache_dir)
    import transformers
    import transformers.modeling_utils  # noqa: F401  # what a start imports: torch's config modules too

    print(f"Transformers {transformers.__version__}: import structure kept in {cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
