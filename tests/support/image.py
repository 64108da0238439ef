"""The real image for the image tests (tests/test_image.py): the engine, the user's own `invoke` tasks,
a stand-in hub to bake from, and `ImageBuilds`, which builds both of the tests' images in the background.

Building is most of what the image tests cost (minutes, against seconds for everything they then run),
and most of a build is the engine working while this process waits. So `ImageBuilds.start()` runs both
builds, one after the other on one thread, from the session's first test (tests/conftest.py starts it
when image tests are selected and an engine answers), and the image tests, which conftest.py runs last,
wait for their image. The builds are the same real `invoke build` a user runs; only when they happen
moved. The first (no model, for a mount) leaves the deps stage in the engine's cache, so the second (the
model baked from the hub) builds only its model and runtime stages. `close()` removes everything they
made, at the end of the session.

CI's engine, podman behind DOCKER_HOST (.ci/podman.sh), runs the builds' steps at a lower priority than
the tests (nice), so the builds take the time the rest of the suite leaves idle and do not slow its
timing tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.paths import ROOT

BAKED_REPO = "qwen-box-test/tiny-qwen"  # the hub id the baked variant is built from
BUILD_TIMEOUT = 1800.0  # seconds for one build: the deps stage installs torch and compiles the kernels


def engine_problem() -> str | None:
    """Why no container engine can be used here, or None when one answers the `docker` CLI."""
    exe = shutil.which("docker")
    if exe is None:
        return "no docker CLI"
    try:
        answer = subprocess.run(
            [exe, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return "the engine gave no answer within 60 s"
    return None if answer.returncode == 0 else f"no engine answers ({answer.stderr.strip()[-200:]})"


def engine_or_skip() -> None:
    """Skip without an engine, except in CI (`CI` set), where a missing engine is a failure."""
    why = engine_problem()
    if why is None:
        return
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


def invoke_argv(*args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `invoke ARGS` as a user runs it from the repository."""
    return [sys.executable, "-m", "invoke", *args], {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def invoke(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    argv, env = invoke_argv(*args)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def dangling_images() -> set[str]:
    return set(docker("images", "--quiet", "--filter", "dangling=true").stdout.split())


def build_options() -> list[str]:
    """This machine's way to build: CI gives a local base image and a local CPU torch wheel."""
    options = []
    if os.environ.get("QWEN_BOX_BASE_IMAGE"):
        options += ["--base-image", os.environ["QWEN_BOX_BASE_IMAGE"]]
    if os.environ.get("QWEN_BOX_WHEELS"):
        options += ["--wheels", os.environ["QWEN_BOX_WHEELS"], "--torch-index", ""]
    return options


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


@dataclass
class Build:
    """One finished `invoke build`: its tag, the container name a test runs it as, and how it went."""

    tag: str
    name: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    hub_requests: list[str] = field(default_factory=list)  # what the bake asked the stand-in hub

    def output(self) -> str:
        return self.stdout[-3000:] + self.stderr[-3000:]


class ImageBuilds:
    """The image tests' two images, built in order on one background thread: "mounted" (`--no-bake`)
    then "baked" (`--model BAKED_REPO` from a FakeHub of the tiny model). `get(variant)` waits for one."""

    VARIANTS = ("mounted", "baked")

    def __init__(self, tiny_model_dir: Path, workdir: Path):
        self.tiny_model_dir = tiny_model_dir
        self.workdir = workdir
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.images: list[str] = []
        self._done = {variant: threading.Event() for variant in self.VARIANTS}
        self._results: dict[str, Build | BaseException] = {}
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[str] | None = None
        self._closing = False
        self._dangling_before: set[str] = set()

    def names(self, suffix: str) -> tuple[str, str]:
        """A fresh (image tag, container name) pair, recorded for removal with the container's volume."""
        tag, name = f"localhost/qwen-box-test:{os.getpid()}-{suffix}", f"qwen-box-test-{os.getpid()}-{suffix}"
        self.images.append(tag)
        self.containers.append(name)
        self.volumes.append(f"{name}-data")
        return tag, name

    def start(self) -> None:
        """Begin building (once); the caller has checked that an engine answers."""
        if self._thread is None:
            self._dangling_before = dangling_images()
            self._thread = threading.Thread(target=self._build_all, name="image-builds", daemon=True)
            self._thread.start()

    def get(self, variant: str) -> Build:
        """The finished build of `variant`, waiting for it (and starting the builds if nobody had)."""
        self.start()
        assert self._done[variant].wait(2 * BUILD_TIMEOUT), f"the {variant} build never finished"
        result = self._results[variant]
        if isinstance(result, BaseException):
            raise result
        return result

    def _build_all(self) -> None:
        for variant in self.VARIANTS:
            try:
                if self._closing:
                    raise RuntimeError("the session ended before this build started")
                self._results[variant] = self._build(variant)
            except BaseException as exc:  # handed to the test that waits for it
                self._results[variant] = exc
            finally:
                self._done[variant].set()

    def _build(self, variant: str) -> Build:
        tag, name = self.names(variant)
        hub = None
        args = ["build", "--tag", tag]
        if variant == "mounted":
            args += ["--no-bake"]
        else:
            hub = FakeHub(BAKED_REPO, hub_layout(self.tiny_model_dir, self.workdir / "hub-folder"))
            args += ["--model", BAKED_REPO, "--hf-endpoint", hub.url]
        argv, env = invoke_argv(*args, *build_options())
        started = time.monotonic()
        try:
            # Its own process group, so that close() can end a build still running (docker CLI and all).
            self._process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            try:
                stdout, stderr = self._process.communicate(timeout=BUILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._stop_process()
                raise AssertionError(f"`invoke {' '.join(args)}` ran over {BUILD_TIMEOUT:.0f} s") from None
            code = self._process.returncode
        finally:
            self._process = None
            if hub is not None:
                hub.close()
        return Build(
            tag=tag,
            name=name,
            returncode=code,
            stdout=stdout,
            stderr=stderr,
            seconds=time.monotonic() - started,
            hub_requests=list(hub.requests) if hub else [],
        )

    def _stop_process(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def close(self) -> list[str]:
        """Stop a build still running, remove every container, volume and image the builds and tests
        made, and return what could not be removed (nothing, when all went well)."""
        if self._thread is None:
            return []
        self._closing = True
        self._stop_process()
        self._thread.join(120)
        for name in self.containers:
            docker("rm", "--force", name, check=False)
        for volume in self.volumes:
            docker("volume", "rm", "--force", volume, check=False)
        for image in self.images:
            docker("rmi", "--force", image, check=False)
        # The builds' intermediate stages; without --force, so an image another build on the same engine
        # is using right now (its stages are dangling too, and new) is refused rather than pulled from
        # under it. A stage is refused while a later one built on it is there, hence the passes.
        # One `rmi` a pass: it removes what it can and refuses the rest.
        for _ in range(5):
            stages = dangling_images() - self._dangling_before
            if stages:
                docker("rmi", *sorted(stages), check=False)
            if not stages or dangling_images() - self._dangling_before == stages:
                break
        left = [v for v in self.volumes if docker("volume", "inspect", v, check=False).returncode == 0]
        left += [i for i in self.images if docker("image", "inspect", i, check=False).returncode == 0]
        return left
