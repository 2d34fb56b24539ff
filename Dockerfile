# docker build -t layerexit:latest .
#
# The image every Ray pod in k8s/ runs (`image: layerexit:latest`; k8s/kustomization.yaml `images:` renames it
# to your registry's copy, docs/kubernetes.md section 2). The repository sits at /home/ray/layerexit, where the
# RayJob entrypoints `cd`, and the `layerexit` package is installed into the image's Python (`pip install .`),
# so every node imports the same code; jobs submitted from a newer checkout ship their package with
# `py_modules` (layerexit.deploy.cluster).
#
# Ray's GPU image: Ubuntu + CUDA + Python 3.11 + Ray 2.60.0. Its Ray version must equal the manifests'
# `rayVersion` and the project's pin; tests/unit/test_dockerfile.py checks both and the Python version.
FROM rayproject/ray:2.60.0-py311-gpu

# The versions the project is tested with (pyproject.toml allows ranges; an image is pinned exactly).
ARG TORCH_VERSION=2.13.0
ARG TRANSFORMERS_VERSION=5.24.0
ARG DEEPSPEED_VERSION=0.19.8
ARG MLFLOW_VERSION=3.17.2
ARG ACCELERATE_VERSION=1.15.0

# A C++ toolchain and ninja: DeepSpeed compiles its CPU Adam on first use (deepspeed.offload_optimizer: true).
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/*
USER ray

WORKDIR /home/ray/layerexit
# Dependencies first (a layer that changes only with pyproject.toml), then the package itself.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform ./platform
RUN pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" \
        "ray[train,serve,tune]==2.60.0" \
        "transformers==${TRANSFORMERS_VERSION}" \
        "deepspeed==${DEEPSPEED_VERSION}" \
        "mlflow==${MLFLOW_VERSION}" \
        "accelerate==${ACCELERATE_VERSION}" \
        . \
    && python -c "import layerexit, ray, torch, deepspeed; assert ray.__version__ == '2.60.0', ray.__version__"
# What the jobs and Serve configs read at run time (entrypoints: cd /home/ray/layerexit && python jobs/...).
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users tune ./tune
COPY --chown=ray:users serve_configs ./serve_configs

ENV TOKENIZERS_PARALLELISM=false \
    HF_HOME=/mnt/shared/hf-cache
