"""The three recipes on a real Ray cluster (2 CPU workers, DeepSpeed ZeRO-2, MLflow), tiny model, same steps:

- distillation raises the exits' agreement with the final layer more than CE-LITE;
- adapters: the base weights do not move, the registered model loads with its adapters attached (plain
  transformers still loads the base), and the early-exit engine decodes through them.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.integration.test_train_ray import history, tiny_config, train, workdir  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXITS = (1, 2, 3)


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


def _config(workdir, name, recipe, **extra):  # noqa: F811
    settings = {"eval__alignment_prompts": 8, "eval__alignment_max_new_tokens": 8, "optim__max_steps": 12,
                "checkpoint__every_steps": None, **extra}
    cfg = tiny_config(workdir, name, **settings)
    cfg["recipe"] = recipe
    cfg["distill"] = {"top_k": 16, "full_every": 4, "chunk_size": 64, "cache_precision": "fp32", "cache_tasks": 2,
                      "cache_dir": str(workdir / f"cache_{name}")}
    cfg["adapters"] = {"rank": 16, "positions_per_batch": 32}
    return cfg


def _gain(result) -> float:
    """Mean over exits of (agreement after - agreement before)."""
    return sum(history(result, f"align/l{l:02d}")[-1] - history(result, f"align/l{l:02d}")[0] for l in EXITS) / len(EXITS)


@pytest.fixture(scope="module")
def runs(ray_local, workdir):  # noqa: F811
    lite = train(_config(workdir, "cmp_lite", "lite", mlflow__register_model=False))
    distill = train(_config(workdir, "cmp_distill", "distill", mlflow__register_model=False))
    adapters = train(_config(workdir, "cmp_adapters", "adapters", optim__lr=1e-2, optim__max_steps=24,
                             mlflow__registered_name="layerexit-tiny_adapters"))
    return {"lite": lite, "distill": distill, "adapters": adapters}


def test_distillation_raises_agreement_more_than_ce_lite(runs):
    gains = {k: _gain(v) for k, v in runs.items() if k != "adapters"}
    assert gains["distill"] > gains["lite"], gains
    assert history(runs["distill"], "teacher_cache/size_mib")[0] > 0


def test_adapters_keep_the_base_and_load_everywhere(runs, workdir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig, SamplingParams
    from layerexit.models.exits import decoder_parts, exit_logits, forward_to_layer
    from layerexit.models.loading import load_model_and_tokenizer

    res = runs["adapters"]
    assert _gain(res) > 0.0
    base = AutoModelForCausalLM.from_pretrained(workdir / "tiny")
    plain = AutoModelForCausalLM.from_pretrained(res.hf_model_dir)  # plain transformers: the base, unchanged
    for (n, a), (_, b) in zip(base.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n
    os.environ["MLFLOW_TRACKING_URI"] = res.tracking_uri
    model, tok = load_model_and_tokenizer("models:/layerexit-tiny_adapters@trained")
    parts = decoder_parts(model)
    assert sorted(parts.adapters) == list(EXITS)
    prompt = tok("Repeat the words sea and sky.")["input_ids"]
    out = EarlyExitEngine(model, set(), tok.pad_token_id).generate(
        [prompt], ExitConfig(policy="fixed", layer=2), SamplingParams(max_new_tokens=4))[0]
    with torch.no_grad():
        h = forward_to_layer(model, torch.tensor([prompt]), 2)[0, -1]
        want = int(exit_logits(parts, h, 2).argmax())
        without = int(parts.head(parts.norm(h)).argmax())
    assert out.token_ids[0] == want and out.exit_layers[0] == 2
    assert history(res, "teacher_cache/positions")[0] > 0
    if want != without:  # the adapter changed the exit's choice: the engine must have used it
        assert out.token_ids[0] != without
