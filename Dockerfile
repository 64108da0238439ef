# qwen-box in one image: the chat service, CPU-only PyTorch and (by default) the model's weights.
#
#   docker build -t qwen-box .                            bakes Qwen/Qwen2.5-1.5B-Instruct into the image, int8
#   docker build -t qwen-box --build-arg BAKE_MODEL=0 .   no weights: mount a folder or a cache at run time
#
# `invoke build` and `invoke run-local` wrap these (README, "Run in Docker"). Build arguments:
#   BASE_IMAGE       Python 3.11 on Debian bookworm, pinned by digest (CI passes a locally made one)
#   TORCH_VERSION    the torch release (the one the README installs)
#   TORCH_INDEX_URL  where torch comes from: the PyTorch CPU wheel index, never the multi-GB CUDA build.
#                    Empty: PyPI plus the wheels/ folder of the build context (an offline CI's CPU wheel)
#   MODEL_ID         hub id of the model, kept in /models/<MODEL_ID>
#   MODEL_REVISION   branch, tag or commit of the model (empty: the hub's main)
#   HF_ENDPOINT      a Hugging Face hub mirror to download from (empty: the hub itself)
#   BAKE_MODEL       1: download the weights at build time and bake them in pre-quantized; 0: leave
#                    /models/<MODEL_ID> empty for a mount
#   PRECISION        int8 or int4: the precision the baked weights are quantized to, once, at build time
#                    (the image's DTYPE; a mounted float model is quantized at load to DTYPE instead)
# A gated model's token, if one is ever needed, goes in as a build secret (`--secret id=hf_token,src=FILE`),
# which is mounted for one step and never stored in a layer.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- deps: a virtualenv with CPU torch and the service's dependencies (copied whole into the final stage)
FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY wheels/ /tmp/wheels/

# torch first: the largest layer, and the one that changes least.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch is pinned (torch==$TORCH_VERSION); hadolint reads the optional `--index-url` expansion as a package.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --find-links /tmp/wheels ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
# The int8/int4 decode kernels (service/inference/kernels.cpp) are compiled here, once, against this
# torch's headers, into the folder the runtime's user finds them in (~/.cache/qwen-box/kernels with
# HOME=/app); the runtime stage has no compiler and loads the built library by its stamp.
COPY service/inference/kernels.py service/inference/kernels.cpp /tmp/kernels/
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++=4:12.2.0-3 ninja-build=1.11.1-2~deb12u1 \
 && if ! python -c "import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))"; then \
      apt-get install -y --no-install-recommends python3-dev=3.11.2-1+b1; \
    fi \
 && rm -rf /var/lib/apt/lists/* \
 && PYTHONPATH=/tmp/kernels python -c "import kernels; kernels.configure('/opt/qwen-box-kernels'); assert kernels.available(), 'the kernels did not build'" \
 && find /opt/qwen-box-kernels -type f ! -name '*.so' ! -name '*.sha256' -delete

# The rest of [project].dependencies, less those only the host's tasks use (invoke, Azure SDK ...):
# infra/image_requirements.py reads both lists from pyproject.toml, so they live in one place.
COPY pyproject.toml infra/image_requirements.py infra/image_prune.py /tmp/
RUN python /tmp/image_requirements.py /tmp/pyproject.toml > /tmp/requirements.txt \
 && pip install --no-cache-dir --find-links /tmp/wheels -r /tmp/requirements.txt

# Then out goes what the service never loads, about 130 MB: C++ headers and test binaries, the packages'
# test suites, type stubs, the bytecode of modules a traced start and generation do not import, symbol
# tables, setuptools and pip. infra/image_prune.py holds that list, with the reason for each entry.
# Its `strip` is binutils', which came with g++ above: in this stage only (the final stage copies the
# venv, not the tools).
RUN python /tmp/image_prune.py qwen2 llama

# ---- download: the float weights, fetched with huggingface_hub at build time (nothing when not baking).
# Its own stage on the bare base, so changing the service's dependencies never downloads the model again.
FROM ${BASE_IMAGE} AS download
ARG MODEL_ID=Qwen/Qwen2.5-1.5B-Instruct
ARG MODEL_REVISION=
ARG BAKE_MODEL=1
ARG HF_ENDPOINT=
ARG HF_HUB_VERSION=2.4.0
# Only what Transformers loads: config, tokenizer, safetensors weights (no .bin/.gguf/ONNX copies).
RUN --mount=type=secret,id=hf_token \
    mkdir -p "/src/$MODEL_ID" \
 && if [ "$BAKE_MODEL" = 1 ]; then \
      if [ -z "$HF_ENDPOINT" ]; then unset HF_ENDPOINT; fi \
      && python3 -m venv /tmp/hf \
      && /tmp/hf/bin/pip install --no-cache-dir --disable-pip-version-check "huggingface_hub==$HF_HUB_VERSION" \
      && HF_TOKEN_PATH=/run/secrets/hf_token HF_HUB_DISABLE_TELEMETRY=1 /tmp/hf/bin/python -c "import os; from huggingface_hub import snapshot_download; snapshot_download(os.environ['MODEL_ID'], revision=os.environ['MODEL_REVISION'] or None, local_dir='/src/' + os.environ['MODEL_ID'], allow_patterns=['*.json', '*.safetensors', '*.txt', '*.model', '*.jinja'])" \
      && rm -rf "/src/$MODEL_ID/.cache" /tmp/hf; \
    fi

# ---- model: the weights quantized once, here, in the layout the service loads in seconds
# (service/inference/checkpoint.py), with the tokenizer and config beside them. Only this folder goes
# into the image: no float copy of the model. Built on the deps stage (torch) with just the modules
# that write a checkpoint, so a change to the rest of the service does not quantize again.
FROM deps AS model
ARG MODEL_ID=Qwen/Qwen2.5-1.5B-Instruct
ARG BAKE_MODEL=1
ARG PRECISION=int8
COPY service/__init__.py service/config.py service/catalog.py service/database.py service/errors.py \
     /opt/quantize/service/
COPY service/inference/__init__.py service/inference/attention.py service/inference/checkpoint.py \
     service/inference/kernels.py service/inference/kernels.cpp service/inference/loading.py \
     service/inference/memory.py service/inference/quantized.py /opt/quantize/service/inference/
WORKDIR /opt/quantize
# A copy, not a bind mount of the stage: buildah cannot bind a cached stage's files. This stage is thrown
# away; the runtime copies only /models from it.
COPY --from=download /src /src
# The slow tokenizer's vocab.json and merges.txt go when tokenizer.json is there (infra/image_prune.py).
RUN mkdir -p "/models/$MODEL_ID" \
 && if [ "$BAKE_MODEL" = 1 ]; then \
      python /tmp/image_prune.py --model-folder "/src/$MODEL_ID" \
      && HF_HUB_OFFLINE=1 python -m service.inference.checkpoint "/src/$MODEL_ID" \
        "/models/$MODEL_ID" --precision "$PRECISION" --model-id "$MODEL_ID"; \
    fi

# ---- runtime: no compilers, no pip, no caches, no tests; runs as an unprivileged user
FROM ${BASE_IMAGE} AS runtime
ARG MODEL_ID=Qwen/Qwen2.5-1.5B-Instruct
ARG BAKE_MODEL=1
ARG PRECISION=int8
# Before ENV MODEL_ID, which would shadow the build argument of the same name. `invoke run-local` reads
# these to know whether the image can serve a model by itself.
LABEL org.opencontainers.image.title="qwen-box" \
      org.opencontainers.image.description="Private local LLM chat service (Flask + Transformers on CPU)" \
      io.qwen-box.model="${MODEL_ID}" \
      io.qwen-box.model-baked="${BAKE_MODEL}" \
      io.qwen-box.precision="${PRECISION}"
# HOST 0.0.0.0 so the published port reaches the server; HF_HUB_OFFLINE because the model is baked or
# mounted (a run that wants downloads into a cache volume sets HF_HUB_OFFLINE=0 itself).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_ID=/models/${MODEL_ID} \
    DTYPE=${PRECISION} \
    DATA_DIR=/data \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1
# /data holds what the service keeps (a named volume in `invoke run-local`); /cache the optional hub cache.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --no-log-init --no-create-home --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /data /cache \
 && chown app:app /data /cache
# Slowest-changing first: the weights (GBs), then the libraries, then the code (a code change: seconds).
COPY --from=model /models /models
COPY --from=deps /opt/venv /opt/venv
COPY --from=deps --chown=app:app /opt/qwen-box-kernels /app/.cache/qwen-box/kernels
WORKDIR /app
# Without service/dev (the benchmark and test models), which .dockerignore leaves out of the context.
# Compiled here (about 0.6 MB) so a start does not compile the service's modules each time (a quarter of
# a second of a start; PYTHONDONTWRITEBYTECODE keeps the server from writing any at run time). And
# Transformers' scan of its model packages, kept in the cache folder the runtime's user reads
# (service/inference/startup.py: 0.6-0.9 s of every start otherwise).
COPY service/ /app/service/
RUN python -m compileall -q /app/service \
 && python -m service.inference.startup /app/.cache/qwen-box
# Numeric, so the engine (and a Kubernetes runAsNonRoot check) can tell it is not root without /etc/passwd.
USER 10001:10001
EXPOSE 8000
# Python's stdlib, since the image has no curl: exit 0 only on HTTP 200 (a 503 while loading raises).
# The start period covers a 1.5B model loading on a small VM; a success inside it counts at once.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/api/health', timeout=4)"]
# The same command `invoke serve` runs: python -m service runs the production gunicorn command.
CMD ["python", "-m", "service"]
