"""The layers of service/ stay apart: only service.web knows Flask, and the web never imports torch.

Why it matters: torch and Transformers take seconds to import and the server must answer health checks
meanwhile (the model loads in the engine's thread); and a domain that does not know HTTP can be driven,
tested and reused without a request. Each import check runs in a fresh interpreter, since this test
process has long imported everything.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"
WEB_ONLY = ("flask", "flask_limiter", "werkzeug")
HEAVY = ("torch", "transformers", "tokenizers", "safetensors")
# Modules of service.inference that import torch: the web may name them only inside a function that
# runs in the engine's thread (web/app.py's loader), never at import.
TORCH_MODULES = ("backend", "loading", "quantized", "attention")


def fresh(code: str) -> dict:
    """Run `code` in a new interpreter; it prints one JSON object, returned here."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


BUILD_AND_SERVE = """
import json, sys, tempfile
from service.config import Settings
from service.inference.engine import Engine
from service.web import create_app

def never():
    raise AssertionError("this test's engine must never be asked to load")

data = tempfile.mkdtemp()
settings = Settings(model_id="test/not-loaded", log_level="warning", data_dir=data)
app = create_app(settings, engine=Engine(never))
client = app.test_client()
statuses = [
    client.get("/").status_code,
    client.get("/api/health").status_code,
    client.get("/api/models").status_code,
    client.get("/v1/models").status_code,
    client.post("/api/chat", json={"message": "hi"}).status_code,
    client.post("/v1/chat/completions", json={"model": "test/not-loaded",
                "messages": [{"role": "user", "content": "hi"}]}).status_code,
    client.get("/api/conversations").status_code,
]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"statuses": statuses, "heavy": heavy}))
""".replace("HEAVY", repr(set(HEAVY)))


def test_building_an_app_and_serving_it_imports_no_torch():
    result = fresh(BUILD_AND_SERVE)
    # The app did serve (the engine was never started, so chat is refused as "loading")...
    assert result["statuses"] == [200, 503, 200, 200, 503, 503, 200]
    # ...and neither torch nor Transformers came along.
    assert result["heavy"] == []


DOMAIN = [
    "service",
    "service.config",
    "service.catalog",
    "service.errors",
    "service.chat",
    "service.models",
    "service.history",
    "service.inference",
    "service.inference.engine",
    "service.inference.text",
    "service.inference.memory",
]


@pytest.mark.parametrize("module", DOMAIN)
def test_the_domain_imports_no_flask(module: str):
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {set(WEB_ONLY)!r})))"
    )
    assert fresh(code) == []


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The absolute module names `path` imports (relative ones resolved inside `service`)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(SERVICE.parent).with_suffix("").parts[:-1])
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            # `from x import y` may import the module x.y as well as a name of x
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _modules(where: Path) -> list[Path]:
    return sorted(where.rglob("*.py"))


def test_only_service_web_names_flask_anywhere():
    """Not even a lazy import: the domain raises service.errors, the web turns them into HTTP."""
    outside = [p for p in _modules(SERVICE) if SERVICE / "web" not in p.parents]
    assert len(outside) > 10
    offenders = {
        str(p.relative_to(SERVICE.parent)): sorted(n for n in imports(p) if n.split(".")[0] in WEB_ONLY)
        for p in outside
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_service_web_never_imports_torch_and_names_the_model_only_lazily():
    heavy_modules = {f"service.inference.{name}" for name in TORCH_MODULES}
    offenders = {}
    for path in _modules(SERVICE / "web"):
        direct = {n for n in imports(path) if n.split(".")[0] in HEAVY}
        at_import = imports(path, top_level_only=True) & heavy_modules
        if direct or at_import:
            offenders[str(path.relative_to(SERVICE.parent))] = sorted(direct | at_import)
    assert offenders == {}


def test_nothing_the_image_ships_needs_service_dev():
    """service/dev is left out of the image (.dockerignore), so the service must never import it."""
    shipped = [p for p in _modules(SERVICE) if SERVICE / "dev" not in p.parents]
    offenders = {
        str(p.relative_to(SERVICE.parent)): sorted(n for n in imports(p) if n.startswith("service.dev"))
        for p in shipped
    }
    assert {k: v for k, v in offenders.items() if v} == {}
