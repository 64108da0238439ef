"""Delete the compiled bytecode of Transformers' model packages the service does not import.

Transformers ships code for hundreds of architectures, and pip compiles every file: about 60 MB of
.pyc under `transformers/models`, of an image whose size is the Azure VM's pull time. The service
imports a handful of them (the Auto classes, the catalog's architectures, what those import). Their
bytecode stays; the others keep their .py source, so a mounted model of another architecture still
loads (Python compiles its modules in memory on first import, a second or so). The Dockerfile's deps
stage runs this with the image's own Python, after installing the dependencies:

    python infra/image_prune.py qwen2 llama
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def imported_model_packages(architectures: list[str]) -> set[str]:
    """The `transformers.models.*` packages imported by loading these architectures' config, model and
    tokenizer classes through the Auto classes (what the service does)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    for name in architectures:
        AutoConfig.for_model(name)
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    del transformers
    return {
        m.split(".")[2] for m in sys.modules if m.startswith("transformers.models.") and m.count(".") >= 2
    }


def main(argv: list[str]) -> int:
    import transformers

    keep = imported_model_packages(argv)
    models = Path(transformers.__file__).parent / "models"
    freed = 0
    for pyc in models.glob("*/**/*.pyc"):
        if pyc.relative_to(models).parts[0] not in keep:
            freed += pyc.stat().st_size
            pyc.unlink()
    print(
        f"kept the bytecode of {len(keep)} model packages ({', '.join(sorted(keep))}); "
        f"freed {freed / 1e6:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
