"""What a training run needs from the Ray cluster it runs on, checked before any worker starts.

- ``is_multi_node``: the run spans several nodes when the cluster has more than one alive node (a KubeRay cluster
  with a CPU head and GPU worker pods counts: the driver and the workers do not share a disk) or when its workers
  do not fit on the largest node (an autoscaler will add nodes).
- ``check_multi_node``: on several nodes, a file-based MLflow store (``sqlite:///...``, ``file:``, a plain path)
  lives on the driver's disk only, so rank 0 on another node would log into a store nobody reads, or fail;
  the checkpoint directory must be a path every node mounts. Fails with the field and the fix.
- ``package_runtime_env``: the ``runtime_env`` that ships the ``layerexit`` package itself to every node
  (``py_modules``), so workers run the driver's code even where the image has another version, or none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from layerexit.errors import ConfigError
from layerexit.tracking import is_file_based_uri


def alive_nodes(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The alive entries of ``ray.nodes()``."""
    return [n for n in nodes if n.get("Alive", n.get("alive", False))]


def is_multi_node(nodes: Sequence[Mapping[str, Any]], num_workers: int, per_worker: Mapping[str, float]) -> bool:
    """True when the run's workers and driver cannot all be on one node (``nodes`` as from ``ray.nodes()``)."""
    alive = alive_nodes(nodes)
    if len(alive) > 1:
        return True
    if not alive:
        return False
    resources = alive[0].get("Resources", {})
    return any(float(resources.get(name, 0.0)) < amount * num_workers for name, amount in per_worker.items())


def check_multi_node(tracking_uri: str, storage_path: str, *, multi_node: bool, num_nodes: int) -> None:
    """Raise ``ConfigError`` when a multi-node run has a file-based tracking store or a node-local storage path."""
    if not multi_node:
        return
    where = f"this run spans several nodes ({num_nodes} alive)" if num_nodes > 1 else (
        "this run's workers do not fit on the one node (the autoscaler will add nodes)")
    if is_file_based_uri(tracking_uri):
        raise ConfigError(
            f"mlflow.tracking_uri: {tracking_uri} is a file on the driver's node, but {where}; "
            "workers on other nodes cannot reach it",
            "run an MLflow server and set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to it, e.g. "
            "http://mlflow:5000 (k8s/mlflow/)",
        )
    expanded = str(Path(storage_path).expanduser())
    if storage_path.startswith("~") or expanded.startswith(("/tmp/", "/var/tmp/")) or expanded in ("/tmp", "/var/tmp"):
        raise ConfigError(
            f"checkpoint.storage_path: {storage_path} is node-local, but {where}; every node must write and read "
            "the same checkpoints",
            "set checkpoint.storage_path to a shared filesystem mounted on every node at the same path, "
            "e.g. /mnt/shared/ray-results (k8s/storage.yaml)",
        )


def package_dir() -> Path:
    """The directory of the ``layerexit`` package the driver runs."""
    import layerexit

    return Path(layerexit.__file__).resolve().parent


def package_runtime_env(env_vars: Mapping[str, str], *, multi_node: bool) -> dict[str, Any]:
    """The Ray Train workers' ``runtime_env``: ``env_vars`` and, on several nodes, the package as ``py_modules``.

    On one node the workers import the package from the driver's own environment; on several nodes Ray uploads
    the driver's package directory once and every node imports that copy.
    """
    env: dict[str, Any] = {"env_vars": dict(env_vars)}
    if multi_node:
        env["py_modules"] = [str(package_dir())]
    return env
