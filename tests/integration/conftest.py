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


def _recount_alignment(result, cfg: dict, world: int):
    """Alignment of every layer with the final layer, counted from the run's saved HF model on its held-out
    alignment prompts, split over ``world`` ranks as ``training.loop.sharded_alignment`` splits them."""
    from transformers import AutoModelForCausalLM

    from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
    from layerexit.evaluation.alignment import alignment_from_generations
    from layerexit.models.loading import load_tokenizer
    from layerexit.training import TrainConfig
    from layerexit.training.loop import merge_alignment_reports
    from layerexit.training.ray_trainer import prepare_training_data

    config = TrainConfig.model_validate(cfg)
    prompts = prepare_training_data(config, show_progress=False).eval_prompts[: config.eval.alignment_prompts]
    model = AutoModelForCausalLM.from_pretrained(result.hf_model_dir).eval()
    tok = load_tokenizer(str(result.hf_model_dir))
    reports = []
    for rank in range(world):
        mine = [list(p) for p in prompts[rank::world]]
        responses = hf_greedy_generate_batched(model, mine, config.eval.alignment_max_new_tokens, tok.pad_token_id,
                                               batch_size=8, eos=eos_ids(model, tok), show_progress=False)
        reports.append(alignment_from_generations(model, mine, responses, show_progress=False))
    return merge_alignment_reports(reports)


@pytest.fixture()
def recount_alignment():
    """``recount(result, cfg_dict, world)``: a training run's per-layer alignment recounted from its saved model."""
    return _recount_alignment
