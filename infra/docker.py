"""Build the qwen-box image and run its one container, through the `docker` command line.

The CLI rather than an SDK because it is what a user already has and has logged in with, it talks to
Docker Desktop, a remote engine or podman's Docker-compatible socket alike (`DOCKER_HOST`), and a test
can put a small stand-in script in its place on PATH. Every failure is a `DockerError` whose message
is written for a person (what happened, the container's last log lines, what to do next); tasks.py
only turns it into an exit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from infra import health
from infra.image import CONTAINER, CONTAINER_PORT, IMAGE, LABEL_BAKED, LABEL_MODEL, MODELS_DIR, data_volume
from service.config import DEFAULT_MODEL_ID

ROOT = Path(__file__).resolve().parent.parent
# A 1.5B model on a small VM's disk loads in a minute or two; the first start after a pull is slower.
HEALTH_TIMEOUT = 900
HEALTH_POLL = 0.5  # seconds between looks at a local container: it is right here, asking is cheap
LOG_TAIL_LINES = 40

NO_DOCKER = (
    "Docker is not installed here (no `docker` command on PATH).\n"
    "Install Docker (Docker Desktop, or Docker Engine on Linux; podman works too through its "
    "Docker-compatible socket and DOCKER_HOST), or run the service without a container:\n"
    "    invoke serve"
)
ENGINE_DOWN = (
    "The `docker` command is here, but the Docker engine does not answer ({detail}).\n"
    "Start Docker (Docker Desktop, or `sudo systemctl start docker`) and try again, or run the service "
    "without a container:\n    invoke serve"
)


class DockerError(Exception):
    """A failure explained for a person; `code` is the exit status the task should end with."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _console() -> Console:
    return Console(stderr=True, highlight=False)


def _docker_exe() -> str:
    exe = shutil.which("docker")
    if exe is None:
        raise DockerError(NO_DOCKER)
    return exe


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one `docker` command quietly and return its result; raise a readable DockerError on failure."""
    argv = [_docker_exe(), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DockerError(
            f"`docker {args[0]}` gave no answer within {timeout:.0f} s; is the Docker engine stuck?"
        ) from None
    if check and proc.returncode != 0:
        raise DockerError(_explain(args, proc.returncode, proc.stderr or proc.stdout))
    return proc


def _explain(args: Sequence[str], code: int, output: str) -> str:
    detail = output.strip()
    lowered = detail.lower()
    if (
        "cannot connect to the docker daemon" in lowered
        or "error during connect" in lowered
        or "is the docker daemon running" in lowered
    ):
        return ENGINE_DOWN.format(detail=detail.splitlines()[-1] if detail else "no answer")
    return f"`docker {' '.join(args)}` failed (exit {code}):\n{detail}"


def _stream(*args: str) -> int:
    """Run a long `docker` command (build, push, logs -f) with its output going straight to the user."""
    return subprocess.run([_docker_exe(), *args], stdin=subprocess.DEVNULL).returncode


def check_engine() -> str:
    """The engine's version, or a DockerError that says Docker is missing or not running."""
    return docker("version", "--format", "{{.Server.Version}}", timeout=30).stdout.strip()


# ---- images


def image_labels(image: str = IMAGE) -> dict[str, str] | None:
    """The image's labels, or None when there is no such image."""
    proc = docker("image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False)
    if proc.returncode != 0:
        if "no such image" in proc.stderr.lower() or "image not known" in proc.stderr.lower():
            return None
        raise DockerError(_explain(["image", "inspect", image], proc.returncode, proc.stderr))
    return json.loads(proc.stdout.strip() or "null") or {}


def image_exists(image: str = IMAGE) -> bool:
    return image_labels(image) is not None


def image_size(image: str = IMAGE) -> int:
    """Bytes the image takes unpacked (what `docker images` shows)."""
    return int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def human_size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@contextmanager
def _wheels_in_context(wheels: str, context: Path) -> Iterator[None]:
    """Put the wheels of folder `wheels` into the build context's wheels/ for one build, then take them out.

    Hard links when the folder is on the same disk (a 190 MB torch wheel costs nothing), copies otherwise.
    """
    source = Path(wheels).expanduser()
    found = sorted(source.glob("*.whl"))
    if not found:
        raise DockerError(f"--wheels {wheels}: no .whl files in that folder")
    target = context / "wheels"
    target.mkdir(exist_ok=True)
    added: list[Path] = []
    try:
        for wheel in found:
            dest = target / wheel.name
            if dest.exists():
                continue
            try:
                os.link(wheel, dest)
            except OSError:
                shutil.copy2(wheel, dest)
            added.append(dest)
        yield
    finally:
        for dest in added:
            dest.unlink(missing_ok=True)


def build(
    image: str = IMAGE,
    *,
    model: str = DEFAULT_MODEL_ID,
    revision: str = "",
    bake: bool = True,
    base_image: str = "",
    torch_index: str | None = None,
    wheels: str = "",
    hf_endpoint: str = "",
    precision: str = "int8",
    context: Path = ROOT,
    console: Console | None = None,
) -> int:
    """Build the image from the repository's Dockerfile and return its size in bytes.

    Options left empty keep the Dockerfile's defaults (official slim Python base, the PyTorch CPU
    index, the Hugging Face hub). `torch_index=""` means PyPI plus `wheels`, for a machine that has a
    CPU wheel on disk. A hub mirror on this machine's loopback is only reachable from the build's
    steps with the host's network, so that case builds with `--network host`.
    """
    console = console or _console()
    check_engine()
    args = [
        "build",
        "--tag",
        image,
        "--build-arg",
        f"MODEL_ID={model}",
        "--build-arg",
        f"BAKE_MODEL={1 if bake else 0}",
        "--build-arg",
        f"PRECISION={precision}",
    ]
    if revision:
        args += ["--build-arg", f"MODEL_REVISION={revision}"]
    if base_image:
        args += ["--build-arg", f"BASE_IMAGE={base_image}"]
    if torch_index is not None:
        args += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    if hf_endpoint:
        args += ["--build-arg", f"HF_ENDPOINT={hf_endpoint}"]
        if urllib.parse.urlsplit(hf_endpoint).hostname in ("127.0.0.1", "localhost", "::1"):
            args += ["--network", "host"]
    args.append(str(context))
    what = (
        f"with {model} baked in ({precision}, quantized once)"
        if bake
        else "without a model (mount one at run time)"
    )
    console.print(f"Building {image} {what} …")
    started = time.monotonic()
    if wheels:
        with _wheels_in_context(wheels, context):
            code = _stream(*args)
    else:
        code = _stream(*args)
    if code != 0:
        raise DockerError(
            f"The image build failed (docker build exit {code}); the build output above "
            "shows the step that failed.",
            code=code,
        )
    size = image_size(image)
    console.print(f"Built {image} in {time.monotonic() - started:.0f} s: {human_size(size)}.")
    return size


# ---- the container


@dataclass(frozen=True)
class ModelChoice:
    """Where the container finds its model: the image's baked copy, a mounted folder, or a cache volume."""

    model_id: str  # what MODEL_ID is inside the container
    bake: bool  # whether an image built for this choice should bake the weights in
    volumes: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    describe: str = ""


def choose_model(model: str, *, name: str = CONTAINER, cache: bool = False) -> ModelChoice:
    """Turn `--model` into mounts and settings: a folder on this machine is mounted read-only; a hub id
    is expected baked into the image, or downloaded on first start into a cache volume with `cache`."""
    model = model or DEFAULT_MODEL_ID
    folder = Path(model).expanduser()
    if folder.is_dir():
        inside = f"{MODELS_DIR}/{folder.resolve().name}"
        return ModelChoice(
            inside,
            bake=False,
            volumes=(f"{folder.resolve()}:{inside}:ro",),
            env=(("MODEL_ID", inside),),
            describe=f"model folder {folder} (mounted read-only)",
        )
    if cache:
        return ModelChoice(
            model,
            bake=False,
            volumes=(f"{name}-models:/cache",),
            env=(("MODEL_ID", model), ("HF_HUB_OFFLINE", "0")),
            describe=f"{model}, downloaded on first start into the volume {name}-models",
        )
    return ModelChoice(f"{MODELS_DIR}/{model}", bake=True, describe=f"{model} (baked into the image)")


def _check_baked(image: str, labels: Mapping[str, str], model: str) -> None:
    baked = labels.get(LABEL_BAKED) == "1"
    has = labels.get(LABEL_MODEL, "")
    if baked and has == model:
        return
    what = f"bakes {has}" if baked else "has no model baked in"
    raise DockerError(
        f"The image {image} {what}, so it cannot serve {model} by itself. Either:\n"
        f"    invoke run-local --rebuild --model {model}        # bake it in (downloads once at build)\n"
        "    invoke run-local --model /path/to/model-folder     # mount a folder you already have\n"
        f"    invoke run-local --model {model} --model-cache     # download on first start into a volume"
    )


def container_info(name: str = CONTAINER) -> dict[str, Any] | None:
    """`docker inspect` of the container, or None when there is none by that name."""
    proc = docker("container", "inspect", name, check=False)
    if proc.returncode != 0:
        return None
    found = json.loads(proc.stdout or "[]")
    return found[0] if found else None


def logs_tail(name: str = CONTAINER, lines: int = LOG_TAIL_LINES) -> str:
    """The container's last log lines (stdout and stderr together), or a note why there are none."""
    proc = docker("logs", "--tail", str(lines), name, check=False)
    text = (proc.stdout + proc.stderr).strip()
    return text or "(the container wrote no log lines)"


def remove_container(name: str = CONTAINER) -> bool:
    """Remove the container if it exists (stopping it first); True if there was one. Volumes stay."""
    if container_info(name) is None:
        return False
    docker("rm", "--force", name)
    return True


def start_container(
    image: str,
    *,
    name: str,
    port: int,
    volumes: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    restart: str = "unless-stopped",
) -> str:
    """(Re)start the one named container and return its id.

    The port is published on 127.0.0.1 only (the service stays private to this machine) and the server
    listens on the same number inside, so it works where the engine shares the host's network too
    (podman with netns=host, `--network host`). The data volume `<name>-data` keeps /data across restarts.
    """
    remove_container(name)
    args = [
        "run",
        "--detach",
        "--name",
        name,
        "--restart",
        restart,
        "--publish",
        f"127.0.0.1:{port}:{port}",
        "--env",
        f"PORT={port}",
        "--volume",
        f"{data_volume(name)}:/data",
    ]
    for volume in volumes:
        args += ["--volume", volume]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    args.append(image)
    return docker(*args).stdout.strip()


def _stopped(info: Mapping[str, Any]) -> bool:
    state = info.get("State") or {}
    return (
        state.get("Status") in ("exited", "dead")
        or bool(state.get("Restarting"))
        or int(info.get("RestartCount") or 0) > 0
    )


def _container_gone(name: str) -> str:
    """Why waiting for `name` cannot help any more ("" while it runs): it was removed, or it exited."""
    info = container_info(name)
    if info is None:
        return f"The container {name} disappeared while starting (removed from outside?)."
    if _stopped(info):
        state = info.get("State") or {}
        return f"The container {name} stopped while starting (exit code {state.get('ExitCode', '?')})."
    return ""


def _phase(answer: health.Health) -> str:
    """A local container's phase in run-local's words: nothing answers yet, or the model is loading."""
    if answer.phase in (*health.NO_ANSWER_PHASES, "starting"):
        return "starting the server"
    return f"loading {answer.detail or 'the model'}"


def wait_healthy(
    name: str,
    port: int,
    *,
    timeout: float = HEALTH_TIMEOUT,
    poll: float = HEALTH_POLL,
    console: Console | None = None,
) -> health.Health:
    """Wait until the container's port answers ok, showing the phase (starting → loading → ok).

    Fails as soon as the container stops or restarts, or the service reports that the model failed to
    load, since waiting longer cannot help then. The probe and the loop are deploy-azure's too
    (infra/health.py); only the stop condition and the words are run-local's.
    """
    console = console or _console()
    with console.status("starting the container …") as status:

        def on_phase(answer: health.Health) -> None:
            if answer.phase not in health.FINAL_PHASES:
                console.print(f"{time.monotonic() - started:5.0f} s  {_phase(answer)} …")

        def on_poll(answer: health.Health, elapsed: float) -> None:
            status.update(f"{_phase(answer)} … {elapsed:.0f} s")

        started = time.monotonic()
        answer = health.wait_healthy(
            "127.0.0.1",
            port,
            timeout=timeout,
            interval=poll,
            on_phase=on_phase,
            on_poll=on_poll,
            stop_if=lambda: _container_gone(name),
            probe_timeout=3.0,
        )
    elapsed = time.monotonic() - started
    if answer.phase == "ok":
        console.print(f"[green]ready[/] after {elapsed:.0f} s")
        return answer
    if answer.phase == "stopped":
        raise DockerError(answer.detail)
    if answer.phase == "error":
        raise DockerError(f"The model failed to load: {answer.detail or 'no detail'}")
    raise DockerError(
        f"The service did not become healthy within {timeout:.0f} s (last state: {_phase(answer)})."
    )


def run_local(
    *,
    image: str = IMAGE,
    name: str = CONTAINER,
    port: int = CONTAINER_PORT,
    model: str = "",
    model_cache: bool = False,
    rebuild: bool = False,
    timeout: float = HEALTH_TIMEOUT,
    env: Mapping[str, str] | None = None,
    console: Console | None = None,
    **build_options: Any,
) -> str:
    """Build the image if needed, (re)start the container, wait until it is healthy; return the URL.

    On any failure after the start (the container exits, never turns healthy, Ctrl-C) the container is
    removed, so nothing is left half-started; the error carries the container's last log lines.
    """
    console = console or _console()
    check_engine()
    wanted = model or DEFAULT_MODEL_ID
    choice = choose_model(wanted, name=name, cache=model_cache)
    labels = None if rebuild else image_labels(image)
    if labels is None:
        build(
            image,
            model=wanted if choice.bake else DEFAULT_MODEL_ID,
            bake=choice.bake,
            console=console,
            **build_options,
        )
    elif choice.bake:
        _check_baked(image, labels, wanted)
    url = f"http://127.0.0.1:{port}"
    console.print(f"Starting {name} from {image}: {choice.describe}, port {port}")
    try:
        start_container(
            image, name=name, port=port, volumes=choice.volumes, env={**dict(choice.env), **(env or {})}
        )
        wait_healthy(name, port, timeout=timeout, console=console)
    except KeyboardInterrupt:
        remove_container(name)
        raise DockerError(f"Interrupted: removed the half-started container {name}.", code=130) from None
    except DockerError as exc:
        tail = logs_tail(name)
        removed = remove_container(name)
        note = f"\nRemoved the container {name}." if removed else ""
        raise DockerError(
            f"{exc}\n--- last lines of the container's log ---\n{tail}\n---{note}", code=exc.code
        ) from None
    console.print(f"qwen-box is running: [bold]{url}[/]  (invoke logs, invoke stop)")
    return url


def stop(name: str = CONTAINER, console: Console | None = None) -> bool:
    """Stop and remove the container (its data volume stays); False if there was none."""
    console = console or _console()
    check_engine()
    if container_info(name) is None:
        console.print(f"No container named {name} is running; nothing to stop.")
        return False
    docker("stop", "--time", "15", name, timeout=60)
    docker("rm", "--force", name)
    console.print(
        f"Stopped and removed {name}; its data volume {data_volume(name)} stays "
        f"(docker volume rm {data_volume(name)} deletes it)."
    )
    return True


def logs(name: str = CONTAINER, *, tail: int = 100, follow: bool = False) -> None:
    """Show the container's log (and follow it with `follow`)."""
    check_engine()
    if container_info(name) is None:
        raise DockerError(f"No container named {name}; start it with: invoke run-local")
    args = ["logs", "--tail", str(tail)] + (["--follow"] if follow else []) + [name]
    code = _stream(*args)
    if code not in (0, 130):
        raise DockerError(f"docker logs exited with {code}", code=code)


def push(target: str, *, image: str = IMAGE, console: Console | None = None) -> None:
    """Tag the local image as `target` (REGISTRY/NAME:TAG) and push it.

    Credentials are Docker's own (`docker login`, `az acr login`): nothing here reads, stores or passes a
    password, so none can end up in the image or its history.
    """
    console = console or _console()
    if "/" not in target:
        raise DockerError(
            f"--image {target!r}: give the full name to push, REGISTRY/NAME:TAG "
            "(e.g. myregistry.azurecr.io/qwen-box:1)."
        )
    check_engine()
    if not image_exists(image):
        raise DockerError(f"There is no image {image} to push yet; build it first: invoke build")
    docker("tag", image, target)
    console.print(f"Pushing {image} as {target} …")
    proc = subprocess.run(
        [_docker_exe(), "push", target], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        registry = target.split("/", 1)[0]
        hint = ""
        if any(word in detail.lower() for word in ("unauthorized", "denied", "authentication required")):
            hint = (
                f"\nLog in to the registry first: docker login {registry}"
                "  (for Azure Container Registry: az acr login --name NAME)."
            )
        raise DockerError(
            f"docker push {target} failed (exit {proc.returncode}):\n{detail}{hint}", code=proc.returncode
        )
    console.print(f"Pushed {target}")
