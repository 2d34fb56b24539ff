"""recipe: eagle3 through the real job on the tiny model: Ray Train (2 CPU workers, DeepSpeed ZeRO-2), MLflow, the
registry. The registered model is the unchanged base plus ``eagle3/`` (vLLM's EAGLE-3 layout) and its draft settings;
the run has held-out acceptance at every draft position and tau, and the draft learned (acceptance rose)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.integration.test_train_ray import history, tiny_config, train, workdir  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def eagle3_run(ray_local, workdir):  # noqa: F811
    cfg = tiny_config(workdir, "tiny_eagle3", optim__lr=3e-3, optim__max_steps=30, optim__epochs=4,
                      checkpoint__every_steps=None,
                      eval__every_steps=15, data__text_tokens=600, mlflow__registered_name="layerexit-tiny_eagle3")
    cfg["recipe"] = "eagle3"
    cfg["distill"] = {"top_k": 8, "cache_precision": "fp32", "cache_tasks": 2, "cache_dir": str(workdir / "cache_e3")}
    cfg["eagle3"] = {"aux_layers": [1, 2, 3], "ttt_steps": 3, "vocab_size": 64, "max_draft": 4, "eval_prompts": 8,
                     "final_eval_prompts": 8}
    return train(cfg)


def test_eagle3_job_registers_the_draft_with_its_settings(eagle3_run, workdir):  # noqa: F811
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from layerexit.models.draft_settings import read_draft_settings
    from layerexit.models.eagle3 import is_eagle3_dir, load_eagle3
    from layerexit.tracking import hf_dir_from_model_uri

    res = eagle3_run
    os.environ["MLFLOW_TRACKING_URI"] = res.tracking_uri
    model_dir = hf_dir_from_model_uri("models:/layerexit-tiny_eagle3@trained")
    assert is_eagle3_dir(model_dir / "eagle3")
    config = json.loads((model_dir / "eagle3" / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    settings = read_draft_settings(model_dir)
    assert settings["draft"] == "eagle3" and 1 <= settings["num_draft"] <= 4 and settings["draft_vocab"]
    # The base model is unchanged (the job trains the draft alone) and the draft loads on it.
    base = AutoModelForCausalLM.from_pretrained(workdir / "tiny")
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    for (n, a), (_, b) in zip(base.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n
    draft = load_eagle3(model_dir / "eagle3", plain.get_input_embeddings())
    assert draft.spec.draft_vocab_size <= 64 and draft.spec.aux_layers == (1, 2, 3)
    # MLflow: acceptance per draft position and tau, during training (before, middle, end) and for the shipped draft.
    for j in range(1, 5):
        assert len(history(res, f"eagle3/accept_pos{j}")) == 3
        assert history(res, f"eagle3/final_accept_pos{j}")
    assert history(res, "eagle3/tau_k4") and history(res, "eagle3/final_tau_k4")[0] >= 1.0
    first, last = history(res, "eagle3/accept_pos1")[0], history(res, "eagle3/accept_pos1")[-1]
    assert last > first, (first, last)
    loss = history(res, "train/loss")
    assert loss[-1] < loss[0]
    assert history(res, "train/ttt_loss_s2")
    artifacts = {a.path for a in MlflowClient(tracking_uri=res.tracking_uri).list_artifacts(res.run_id)}
    assert {"eagle3", "eagle3_choice.json"} <= artifacts
