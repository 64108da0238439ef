# Sourced by .ci/run (or by hand: `. .ci/podman.sh`) to give the image test a Docker-compatible engine on a
# machine that has no Docker engine and reaches no container registry: podman behind a Docker API socket,
# a Debian bookworm base image made with debootstrap, and the machine's CPU torch wheel.
# Exports DOCKER_HOST, CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, QWEN_BOX_BASE_IMAGE and QWEN_BOX_WHEELS;
# stops the podman service when the calling shell exits.

apt-get install -y -qq podman buildah runc debootstrap >/dev/null

QB_PODMAN_DIR="$(mktemp -d /tmp/qwen-box-podman.XXXXXX)"
# crun cannot run here (cgroups in hybrid mode) and raising ulimits is not permitted, hence runc and
# lowered defaults; overlay, because vfs copies every layer in full.
cat >"$QB_PODMAN_DIR/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
[engine.runtimes]
runc = ["/usr/sbin/runc"]
EOF
cat >"$QB_PODMAN_DIR/storage.conf" <<'EOF'
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
export CONTAINERS_CONF="$QB_PODMAN_DIR/containers.conf" CONTAINERS_STORAGE_CONF="$QB_PODMAN_DIR/storage.conf"

# The base image: what python:3.11-slim-bookworm gives (Debian bookworm, Python 3.11), from Debian's
# packages. The build's pip must trust what this machine trusts, so the machine's CA bundle goes in.
export QWEN_BOX_BASE_IMAGE=localhost/debian-base:bookworm
if ! podman image exists "$QWEN_BOX_BASE_IMAGE"; then
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$QB_PODMAN_DIR/rootfs" >"$QB_PODMAN_DIR/debootstrap.log"
  cp /etc/ssl/certs/ca-certificates.crt "$QB_PODMAN_DIR/rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$QB_PODMAN_DIR"/rootfs/var/cache/apt/archives/*.deb "$QB_PODMAN_DIR"/rootfs/var/lib/apt/lists/*
  tar -C "$QB_PODMAN_DIR/rootfs" -c . | podman import --quiet - "$QWEN_BOX_BASE_IMAGE" >/dev/null
  rm -rf "$QB_PODMAN_DIR/rootfs"
fi

# torch from the local CPU wheel when the machine has one (the PyTorch index is out of reach here).
if compgen -G "/opt/wheels/torch-*.whl" >/dev/null; then
  export QWEN_BOX_WHEELS=/opt/wheels
fi

# Niced: the image tests' builds run in the service (their RUN steps are its children) while the rest of
# the suite runs (tests/support/image.py), so they take the CPU the tests leave idle, not the tests' share.
nice -n 19 podman system service --time=0 "unix://$QB_PODMAN_DIR/podman.sock" >"$QB_PODMAN_DIR/service.log" 2>&1 &
QB_PODMAN_PID=$!
trap 'kill "$QB_PODMAN_PID" 2>/dev/null || true' EXIT
export DOCKER_HOST="unix://$QB_PODMAN_DIR/podman.sock"
for _ in $(seq 50); do [ -S "$QB_PODMAN_DIR/podman.sock" ] && break; sleep 0.2; done
