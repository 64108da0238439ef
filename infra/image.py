"""Facts about the qwen-box image and its one container, one constant each.

run-local (infra/docker.py), the VM's start script and reverse proxy (infra/vm/) and the Azure deployment
all name the same container, port and model folder; defining each here once means they cannot drift
apart. The Dockerfile states the same facts for the build (EXPOSE 8000, /models, the labels), and
tests/test_image.py checks them there.
"""

from __future__ import annotations

IMAGE = "qwen-box:latest"  # the local image `invoke build` makes and `invoke run-local` runs
CONTAINER = "qwen-box"  # the one container's name, locally and on the VM; its data volume is NAME-data
CONTAINER_PORT = 8000  # where the service listens inside the container (the service's own PORT default)
MODELS_DIR = "/models"  # where the image keeps its baked model, and where a model folder is mounted
LABEL_MODEL = "io.qwen-box.model"  # the hub id the image was built for
LABEL_BAKED = "io.qwen-box.model-baked"  # "1" when that model's weights are inside the image


def data_volume(container: str = CONTAINER) -> str:
    """The named volume that keeps the container's /data (history) across restarts and updates."""
    return f"{container}-data"
