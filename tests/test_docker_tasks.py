"""The container tasks' own paths, run as a user runs them (`invoke ...` in a subprocess), against a
stand-in `docker` executable on PATH.

The stand-in records every argv and plays a scripted outcome per command, so the failures a real engine
makes hard to stage (no Docker, an engine that is down, a container that exits, one that never turns
healthy, Ctrl-C mid-start) are cheap and exact. Where the task waits on /api/health, a real HTTP server
on a loopback port answers. The real engine and image are exercised in test_image.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.health import HealthServer
from tests.support.live import free_port
from tests.support.paths import ROOT

STAND_IN = '''#!{python}
"""Stand-in for the docker CLI: logs argv, then plays the next scripted outcome for this command."""
import json, os, sys
args = sys.argv[1:]
here = os.environ["FAKE_DOCKER_DIR"]
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
key = args[0]
if key in ("image", "container"):
    key += " " + args[1]
if "--format" in args:
    key += " " + args[args.index("--format") + 1]
with open(os.path.join(here, "script.json")) as f:
    script = json.load(f)
counts_path = os.path.join(here, "counts.json")
counts = json.load(open(counts_path)) if os.path.exists(counts_path) else {{}}
outcomes = script.get(key) or [{{}}]
outcome = outcomes[min(counts.get(key, 0), len(outcomes) - 1)]
counts[key] = counts.get(key, 0) + 1
json.dump(counts, open(counts_path, "w"))
if key == "build":
    context = args[-1]
    print("wheels in context:", sorted(os.listdir(os.path.join(context, "wheels"))))
if outcome.get("sleep"):
    import time
    time.sleep(outcome["sleep"])
sys.stdout.write(outcome.get("out", ""))
sys.stderr.write(outcome.get("err", ""))
sys.exit(outcome.get("code", 0))
'''

BAKED = {"io.qwen-box.model": "Qwen/Qwen2.5-1.5B-Instruct", "io.qwen-box.model-baked": "1"}
NOT_FOUND = {"code": 1, "err": "Error: No such object: qwen-box\n"}
RUNNING = {"out": json.dumps([{"State": {"Status": "running", "Running": True}, "RestartCount": 0}])}
ENGINE_OK = {"version {{.Server.Version}}": [{"out": "28.2.2\n"}]}


def labels(value: dict | None) -> dict:
    if value is None:
        return {"code": 1, "err": "Error: No such image: qwen-box:latest\n"}
    return {"out": json.dumps(value) + "\n"}


class FakeDocker:
    """A bin folder holding the stand-in, its script, and the calls it saw."""

    def __init__(self, root: Path):
        self.dir = root
        self.bin = root / "bin"
        self.bin.mkdir()
        exe = self.bin / "docker"
        exe.write_text(STAND_IN.format(python=sys.executable))
        exe.chmod(0o755)
        self.script()

    def script(self, **outcomes: list[dict]) -> None:
        """Outcomes per command key ("run", "container inspect", "logs" ...), played in order, the last
        one repeating. Keys with a --format carry it: "image inspect {{json .Config.Labels}}"."""
        (self.dir / "script.json").write_text(json.dumps({**ENGINE_OK, **outcomes}))

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def commands(self) -> list[str]:
        return [" ".join(c[:2]) if c[0] in ("image", "container") else c[0] for c in self.calls()]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": str(self.bin),
            "FAKE_DOCKER_DIR": str(self.dir),
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }

    def invoke(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "invoke", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def fake(tmp_path: Path) -> FakeDocker:
    return FakeDocker(tmp_path)


@pytest.fixture
def health() -> Iterator:
    """A real /api/health on a loopback port: `health(*answers)`, each (status, body), the last repeating."""
    servers: list[HealthServer] = []

    def make(*answers: tuple[int, dict]) -> HealthServer:
        servers.append(HealthServer(list(answers)))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


LOADING = (503, {"status": "loading", "model": "/models/Qwen/Qwen2.5-1.5B-Instruct"})
OK = (200, {"status": "ok", "model": "/models/Qwen/Qwen2.5-1.5B-Instruct"})


# ---- no Docker, or an engine that does not answer


@pytest.mark.parametrize(
    "task", [["run-local"], ["build"], ["stop"], ["logs"], ["push", "--image", "registry.example/qwen-box:1"]]
)
def test_without_docker_every_task_points_at_invoke_serve(tmp_path: Path, task: list[str]):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", *task],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(empty)},
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Docker is not installed" in proc.stderr
    assert "invoke serve" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_engine_down_says_so_and_points_at_invoke_serve(fake: FakeDocker):
    fake.script(
        **{
            "version {{.Server.Version}}": [
                {
                    "code": 1,
                    "err": (
                        "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                        "Is the docker daemon running?\n"
                    ),
                }
            ]
        }
    )
    proc = fake.invoke("run-local")
    assert proc.returncode == 1
    assert "engine does not answer" in proc.stderr and "invoke serve" in proc.stderr
    assert fake.commands() == ["version"]  # nothing was built or started


# ---- run-local


def test_run_local_starts_one_named_container_and_prints_the_url(fake: FakeDocker, health):
    server = health(LOADING, LOADING, OK)
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "container inspect": [NOT_FOUND, RUNNING],
            "run": [{"out": "f00d\n"}],
        }
    )
    proc = fake.invoke("run-local", "--port", str(server.port))
    assert proc.returncode == 0, proc.stderr
    assert f"http://127.0.0.1:{server.port}" in proc.stderr
    assert "loading /models/Qwen/Qwen2.5-1.5B-Instruct" in proc.stderr and "ready after" in proc.stderr
    run = next(c for c in fake.calls() if c[0] == "run")
    assert run == [
        "run",
        "--detach",
        "--name",
        "qwen-box",
        "--restart",
        "unless-stopped",
        "--publish",
        f"127.0.0.1:{server.port}:{server.port}",
        "--env",
        f"PORT={server.port}",
        "--volume",
        "qwen-box-data:/data",
        "qwen-box:latest",
    ]
    assert "build" not in fake.commands()  # the image was there
    assert "rm" not in fake.commands()  # and nothing to replace


def test_run_local_replaces_the_old_container(fake: FakeDocker, health):
    server = health(OK)
    fake.script(**{"image inspect {{json .Config.Labels}}": [labels(BAKED)], "container inspect": [RUNNING]})
    assert fake.invoke("run-local", "--port", str(server.port)).returncode == 0
    commands = fake.commands()
    assert commands.index("rm") < commands.index("run")
    assert ["rm", "--force", "qwen-box"] in fake.calls()


def test_run_local_builds_a_missing_image_and_mounts_a_model_folder(fake: FakeDocker, health, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    server = health(OK)
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(None)],
            "image inspect {{.Size}}": [{"out": "1140000000\n"}],
            "container inspect": [NOT_FOUND, RUNNING],
        }
    )
    proc = fake.invoke("run-local", "--port", str(server.port), "--model", str(model))
    assert proc.returncode == 0, proc.stderr
    build = next(c for c in fake.calls() if c[0] == "build")
    assert "BAKE_MODEL=0" in build and build[-1] == str(ROOT)
    assert "Built qwen-box:latest" in proc.stderr and "1.14 GB" in proc.stderr
    run = next(c for c in fake.calls() if c[0] == "run")
    assert f"{model}:/models/my-model:ro" in run and "MODEL_ID=/models/my-model" in run


def test_run_local_with_a_cache_volume_downloads_on_first_start(fake: FakeDocker, health):
    server = health(OK)
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels({"io.qwen-box.model-baked": "0"})],
            "container inspect": [NOT_FOUND, RUNNING],
        }
    )
    proc = fake.invoke(
        "run-local", "--port", str(server.port), "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--model-cache"
    )
    assert proc.returncode == 0, proc.stderr
    run = next(c for c in fake.calls() if c[0] == "run")
    assert "qwen-box-models:/cache" in run and "HF_HUB_OFFLINE=0" in run
    assert "MODEL_ID=Qwen/Qwen2.5-0.5B-Instruct" in run


def test_run_local_passes_service_settings(fake: FakeDocker, health):
    server = health(OK)
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "container inspect": [NOT_FOUND, RUNNING],
        }
    )
    proc = fake.invoke(
        "run-local", "--port", str(server.port), "--env", "DTYPE=float32", "--env", "ACCESS_TOKEN=s3cret=ok"
    )
    assert proc.returncode == 0, proc.stderr
    run = next(c for c in fake.calls() if c[0] == "run")
    assert "DTYPE=float32" in run and "ACCESS_TOKEN=s3cret=ok" in run


def test_run_local_refuses_a_malformed_setting(fake: FakeDocker):
    proc = fake.invoke("run-local", "--env", "DTYPE")
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr
    assert "run" not in fake.commands()


def test_run_local_refuses_an_image_without_that_model(fake: FakeDocker):
    fake.script(**{"image inspect {{json .Config.Labels}}": [labels({"io.qwen-box.model-baked": "0"})]})
    proc = fake.invoke("run-local")
    assert proc.returncode == 1
    assert "has no model baked in" in proc.stderr
    assert "--rebuild" in proc.stderr and "--model-cache" in proc.stderr
    assert "/path/to/model-folder" in proc.stderr
    assert "run" not in fake.commands()


def test_container_that_exits_fails_with_its_last_log_lines_and_is_removed(fake: FakeDocker, health):
    server = health(LOADING)
    exited = {"out": json.dumps([{"State": {"Status": "exited", "ExitCode": 3}, "RestartCount": 0}])}
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "container inspect": [NOT_FOUND, exited],
            "logs": [
                {
                    "out": "Booting worker with pid: 6\n",
                    "err": "PermissionError: [Errno 13] Permission denied: 'data'\n",
                }
            ],
        }
    )
    proc = fake.invoke("run-local", "--port", str(server.port))
    assert proc.returncode == 1
    assert "stopped while starting (exit code 3)" in proc.stderr
    assert "Permission denied: 'data'" in proc.stderr and "Booting worker" in proc.stderr
    assert "Removed the container qwen-box" in proc.stderr
    calls = fake.calls()
    assert ["logs", "--tail", "40", "qwen-box"] in calls
    assert calls[-1] == ["rm", "--force", "qwen-box"]


def test_crash_loop_under_the_restart_policy_counts_as_exited(fake: FakeDocker, health):
    server = health(LOADING)
    restarting = {
        "out": json.dumps(
            [{"State": {"Status": "restarting", "Restarting": True, "ExitCode": 2}, "RestartCount": 3}]
        )
    }
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "container inspect": [NOT_FOUND, restarting],
            "logs": [{"out": "error: PORT must be...\n"}],
        }
    )
    proc = fake.invoke("run-local", "--port", str(server.port))
    assert proc.returncode == 1 and "stopped while starting" in proc.stderr
    assert "PORT must be" in proc.stderr and fake.calls()[-1] == ["rm", "--force", "qwen-box"]


def test_never_healthy_gives_up_after_the_timeout_with_the_log_tail(fake: FakeDocker, health):
    server = health(LOADING)
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "container inspect": [NOT_FOUND, RUNNING],
            "logs": [{"out": "Loading weights:  12%\n"}],
        }
    )
    started = time.monotonic()
    proc = fake.invoke("run-local", "--port", str(server.port), "--timeout", "2")
    assert proc.returncode == 1
    assert time.monotonic() - started < 30
    assert "did not become healthy within 2 s" in proc.stderr
    assert "last state: loading" in proc.stderr and "Loading weights:  12%" in proc.stderr
    assert server.hits >= 2
    assert fake.calls()[-1] == ["rm", "--force", "qwen-box"]


def test_nothing_listening_is_never_healthy_either(fake: FakeDocker):
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "container inspect": [NOT_FOUND, RUNNING],
        }
    )
    proc = fake.invoke("run-local", "--port", str(free_port()), "--timeout", "1")
    assert proc.returncode == 1 and "last state: starting the server" in proc.stderr
    assert fake.calls()[-1] == ["rm", "--force", "qwen-box"]


def test_model_load_failure_fails_at_once(fake: FakeDocker, health):
    server = health(LOADING, (503, {"status": "error", "detail": "OSError: no file named model.safetensors"}))
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "container inspect": [NOT_FOUND, RUNNING],
        }
    )
    proc = fake.invoke("run-local", "--port", str(server.port), "--timeout", "600")
    assert proc.returncode == 1
    assert "The model failed to load: OSError: no file named model.safetensors" in proc.stderr
    assert fake.calls()[-1] == ["rm", "--force", "qwen-box"]


def test_ctrl_c_while_waiting_removes_the_half_started_container(fake: FakeDocker):
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "container inspect": [NOT_FOUND, RUNNING],
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "run-local", "--port", str(free_port())],
        cwd=ROOT,
        env=fake.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        # Wait until the task is in its health loop: the container was started and then inspected.
        while time.monotonic() < deadline:
            commands = fake.commands()
            if "run" in commands and "container inspect" in commands[commands.index("run") :]:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"run-local never reached its wait: {fake.commands()}")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Interrupted: removed the half-started container qwen-box" in err
    assert "Traceback" not in err
    assert fake.calls()[-1] == ["rm", "--force", "qwen-box"]


def test_ctrl_c_during_the_build_leaves_no_wheels_behind(fake: FakeDocker, tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-0.0.1+cpu-cp311-none-any.whl").write_bytes(b"not really a wheel")
    fake.script(**{"image inspect {{json .Config.Labels}}": [labels(None)], "build": [{"sleep": 30}]})
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "run-local", "--wheels", str(wheels)],
        cwd=ROOT,
        env=fake.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "build" not in fake.commands() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not (ROOT / "wheels" / "torch-0.0.1+cpu-cp311-none-any.whl").exists()
    assert "run" not in fake.commands()


# ---- build, push, stop, logs


def test_build_passes_its_options_and_puts_wheels_in_the_context_only_for_the_build(fake, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-0.0.0+cpu-cp311-none-any.whl").write_bytes(b"not really a wheel")
    fake.script(**{"image inspect {{.Size}}": [{"out": "987000000\n"}]})
    proc = fake.invoke(
        "build",
        "--tag",
        "qwen-box:test",
        "--no-bake",
        "--base-image",
        "localhost/base:1",
        "--torch-index",
        "",
        "--wheels",
        str(wheels),
    )
    assert proc.returncode == 0, proc.stderr
    build = next(c for c in fake.calls() if c[0] == "build")
    assert build == [
        "build",
        "--tag",
        "qwen-box:test",
        "--build-arg",
        "MODEL_ID=Qwen/Qwen2.5-1.5B-Instruct",
        "--build-arg",
        "BAKE_MODEL=0",
        "--build-arg",
        "PRECISION=int8",
        "--build-arg",
        "BASE_IMAGE=localhost/base:1",
        "--build-arg",
        "TORCH_INDEX_URL=",
        str(ROOT),
    ]
    assert "torch-0.0.0+cpu-cp311-none-any.whl" in proc.stdout  # seen by the build
    assert not (ROOT / "wheels" / "torch-0.0.0+cpu-cp311-none-any.whl").exists()  # and gone after
    assert "Built qwen-box:test" in proc.stderr and "987 MB" in proc.stderr


def test_build_defaults_bake_the_default_model(fake):
    fake.script(**{"image inspect {{.Size}}": [{"out": "4230000000\n"}]})
    proc = fake.invoke("build", "--revision", "abc123")
    assert proc.returncode == 0, proc.stderr
    build = next(c for c in fake.calls() if c[0] == "build")
    assert "BAKE_MODEL=1" in build and "MODEL_REVISION=abc123" in build and "PRECISION=int8" in build
    assert not any(arg.startswith(("BASE_IMAGE=", "TORCH_INDEX_URL=")) for arg in build)
    assert "with Qwen/Qwen2.5-1.5B-Instruct baked in (int8" in proc.stderr and "4.23 GB" in proc.stderr


def test_build_bakes_at_the_precision_asked(fake):
    fake.script(**{"image inspect {{.Size}}": [{"out": "2230000000\n"}]})
    proc = fake.invoke("build", "--precision", "int4")
    assert proc.returncode == 0, proc.stderr
    build = next(c for c in fake.calls() if c[0] == "build")
    assert "PRECISION=int4" in build and "PRECISION=int8" not in build


@pytest.mark.parametrize(
    "mirror, host_network", [("http://127.0.0.1:8765", True), ("https://hub-mirror.example", False)]
)
def test_build_from_a_hub_mirror(fake, mirror, host_network):
    fake.script(**{"image inspect {{.Size}}": [{"out": "4230000000\n"}]})
    assert fake.invoke("build", "--hf-endpoint", mirror).returncode == 0
    build = next(c for c in fake.calls() if c[0] == "build")
    assert f"HF_ENDPOINT={mirror}" in build
    assert ("--network" in build) == host_network  # a mirror on loopback needs the host's network


def test_failed_build_says_so_without_a_traceback(fake):
    fake.script(build=[{"code": 1, "err": "ERROR: failed to solve\n"}])
    proc = fake.invoke("build")
    assert proc.returncode == 1
    assert "The image build failed" in proc.stderr and "Traceback" not in proc.stderr


def test_push_tags_then_pushes(fake):
    fake.script(**{"image inspect {{json .Config.Labels}}": [labels(BAKED)]})
    proc = fake.invoke("push", "--image", "myreg.azurecr.io/qwen-box:1")
    assert proc.returncode == 0, proc.stderr
    assert ["tag", "qwen-box:latest", "myreg.azurecr.io/qwen-box:1"] in fake.calls()
    assert fake.calls()[-1] == ["push", "myreg.azurecr.io/qwen-box:1"]


def test_push_refused_by_the_registry_says_how_to_log_in(fake):
    fake.script(
        **{
            "image inspect {{json .Config.Labels}}": [labels(BAKED)],
            "push": [{"code": 1, "err": "unauthorized: authentication required\n"}],
        }
    )
    proc = fake.invoke("push", "--image", "myreg.azurecr.io/qwen-box:1")
    assert proc.returncode == 1
    assert "docker login myreg.azurecr.io" in proc.stderr and "az acr login" in proc.stderr


@pytest.mark.parametrize(
    "image, message",
    [("", "invoke push --image REGISTRY/NAME:TAG"), ("qwen-box:1", "give the full name to push")],
)
def test_push_needs_a_registry_name(fake, image, message):
    proc = fake.invoke("push", "--image", image) if image else fake.invoke("push")
    assert proc.returncode != 0 and message in proc.stderr
    assert "push" not in fake.commands()


def test_push_without_an_image_says_build_first(fake):
    fake.script(**{"image inspect {{json .Config.Labels}}": [labels(None)]})
    proc = fake.invoke("push", "--image", "myreg.azurecr.io/qwen-box:1")
    assert proc.returncode == 1 and "invoke build" in proc.stderr


def test_stop_removes_the_container_and_keeps_the_data(fake):
    fake.script(**{"container inspect": [RUNNING]})
    proc = fake.invoke("stop")
    assert proc.returncode == 0, proc.stderr
    assert ["stop", "--time", "15", "qwen-box"] in fake.calls()
    assert ["rm", "--force", "qwen-box"] in fake.calls()
    assert "qwen-box-data stays" in proc.stderr


def test_stop_with_nothing_running_is_fine(fake):
    fake.script(**{"container inspect": [NOT_FOUND]})
    proc = fake.invoke("stop")
    assert proc.returncode == 0 and "nothing to stop" in proc.stderr
    assert "stop" not in fake.commands()


def test_logs_shows_the_tail(fake):
    fake.script(**{"container inspect": [RUNNING], "logs": [{"out": "Listening at: http://0.0.0.0:8000\n"}]})
    proc = fake.invoke("logs", "--tail", "5")
    assert proc.returncode == 0 and "Listening at" in proc.stdout
    assert fake.calls()[-1] == ["logs", "--tail", "5", "qwen-box"]


def test_logs_without_a_container_says_how_to_start_one(fake):
    fake.script(**{"container inspect": [NOT_FOUND]})
    proc = fake.invoke("logs")
    assert proc.returncode == 1 and "invoke run-local" in proc.stderr


@pytest.mark.parametrize("task", ["build", "run-local", "push", "stop", "logs"])
def test_every_container_task_explains_itself_and_its_defaults(task):
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "--help", task], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "Docstring:" in text and "default" in text
