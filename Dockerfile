# docker build --target train -t layerexit:latest .
# docker build --target vllm -t layerexit-vllm:latest .
# docker build --target tune -t layerexit-tune:latest .
#
# Two images from one file, both pinned by the lock in requirements/ (`make lock` regenerates it):
# - target `train` -> layerexit:latest: training (Ray Train + DeepSpeed), tuning, evaluation and our own engine's
#   Serve app. Installs the project with requirements/lock.txt, the lock `make test` runs with, as pip constraints
#   (the same `torch==2.13.0` pin takes the CUDA build here).
# - target `vllm` -> layerexit-vllm:latest: Ray Serve + vLLM (serve_configs/7b.yaml, k8s/rayservice-7b.yaml).
#   vLLM pins an older transformers than the project, so it gets its own lock, requirements/vllm-gpu.lock.txt, and
#   the project goes in without its dependencies (the vLLM app imports only its config/resolver modules), exactly as
#   `make vllm-env` builds .venv-vllm on CPUs.
# - target `tune` -> layerexit-tune:latest: the training image plus vLLM in its own environment (/home/ray/vllm-venv,
#   from requirements/vllm-gpu.lock.txt) for the draft search (jobs/tune_draft.py), which runs our engine in the
#   project's Python and confirms its choice with vLLM (`confirm.python: auto` finds $LAYEREXIT_VLLM_PYTHON).
# The repository sits at /home/ray/layerexit, where the RayJob entrypoints `cd`; k8s/kustomization.yaml (`images:`)
# renames both images to your registry's copies (docs/kubernetes.md). Ray's GPU image gives Ubuntu + CUDA + Python
# 3.11 + Ray 2.60.0; its Ray version must equal the manifests' `rayVersion` and the locks' (tests/unit/test_dockerfile.py).
# torch 2.13.0's CUDA wheels bring CUDA 13 libraries: the nodes need an NVIDIA driver that supports CUDA 13.
FROM rayproject/ray:2.60.0-py311-gpu AS base

# A C++ toolchain and ninja: DeepSpeed compiles its CPU Adam on first use (deepspeed.offload_optimizer: true).
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/layerexit
ENV TOKENIZERS_PARALLELISM=false \
    HF_HOME=/mnt/shared/hf-cache

FROM base AS train
# Dependencies first (a layer that changes only with the lock and pyproject.toml), then the package itself.
COPY --chown=ray:users requirements/lock.txt ./requirements/lock.txt
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform ./platform
RUN pip install --no-cache-dir -c requirements/lock.txt . \
    && python -m layerexit.envlock check requirements/lock.txt --installed-only \
    && python -c "import layerexit, ray, torch, deepspeed; assert ray.__version__ == '2.60.0', ray.__version__"
# What the jobs and Serve configs read at run time (entrypoints: cd /home/ray/layerexit && python jobs/...).
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users tune ./tune
COPY --chown=ray:users serve_configs ./serve_configs
# The device check (benchmarks/gpu_check.py, docs/gpu.md) and the other GPU benchmarks.
COPY --chown=ray:users benchmarks ./benchmarks

FROM base AS vllm
COPY --chown=ray:users requirements/vllm-gpu.lock.txt ./requirements/vllm-gpu.lock.txt
RUN pip install --no-cache-dir -c requirements/vllm-gpu.lock.txt \
        "vllm==0.32.0" "ray[serve]==2.60.0" "mlflow>=3.0,<4" "openai>=1.30"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform ./platform
RUN pip install --no-cache-dir --no-deps . \
    && python -m layerexit.envlock check requirements/vllm-gpu.lock.txt --installed-only \
    && python -c "import vllm, ray.serve, mlflow, layerexit.serving.vllm_config"
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users tune ./tune
COPY --chown=ray:users serve_configs ./serve_configs

FROM train AS tune
COPY --chown=ray:users requirements/vllm-gpu.lock.txt ./requirements/vllm-gpu.lock.txt
RUN python -m venv /home/ray/vllm-venv \
    && /home/ray/vllm-venv/bin/pip install --no-cache-dir -c requirements/vllm-gpu.lock.txt \
        "vllm==0.32.0" "ray[serve]==2.60.0" "mlflow>=3.0,<4" "openai>=1.30" \
    && /home/ray/vllm-venv/bin/pip install --no-cache-dir --no-deps . \
    && /home/ray/vllm-venv/bin/python -m layerexit.envlock check requirements/vllm-gpu.lock.txt --installed-only \
    && /home/ray/vllm-venv/bin/python -c "import vllm, layerexit.serving.vllm_check"
ENV LAYEREXIT_VLLM_PYTHON=/home/ray/vllm-venv/bin/python
