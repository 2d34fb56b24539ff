"""Isolation between integration modules: each module leaves the process as it found it.

Library entry points (``run_training``, the demo stages) attach to Ray if it is up and start it otherwise, and
leave it running for the caller's next step; MLflow's fluent API keeps an active experiment per process. Both
are right for a user's job and wrong across test modules: a later module's ``ray.init(...)`` then fails with
"called ray.init twice", and ``mlflow.start_run(run_id=...)`` refuses a run from another store's experiment.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_ray_mlflow_and_env_as_found():
    import ray

    env = dict(os.environ)
    ray_was_up = ray.is_initialized()
    yield
    if ray.is_initialized() and not ray_was_up:
        ray.shutdown()
    import mlflow
    from mlflow.tracking import fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    fluent._active_experiment_id = None
    os.environ.clear()
    os.environ.update(env)
