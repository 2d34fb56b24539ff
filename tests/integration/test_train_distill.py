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


def _config(workdir, name, recipe, adapters=None, draft=None, **extra):  # noqa: F811
    extra_adapters = adapters or {}
    settings = {"eval__alignment_prompts": 8, "eval__alignment_max_new_tokens": 8, "optim__max_steps": 12,
                "checkpoint__every_steps": None, **extra}
    cfg = tiny_config(workdir, name, **settings)
    cfg["recipe"] = recipe
    cfg["distill"] = {"top_k": 16, "full_every": 4, "chunk_size": 64, "cache_precision": "fp32", "cache_tasks": 2,
                      "cache_dir": str(workdir / f"cache_{name}")}
    cfg["adapters"] = {"rank": 16, "positions_per_batch": 32, **extra_adapters}
    if draft:
        cfg["draft"] = draft
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
    decoder = train(_config(workdir, "cmp_decoder", "adapters", optim__lr=3e-3, optim__max_steps=24,
                            adapters={"kind": "decoder_layer", "num_layers": 1, "init": "zero_residual"},
                            draft={"choose": True, "max_layer": 2, "max_draft": 3, "prompts": 4, "max_new_tokens": 8,
                                   "vocab_size": 64},
                            mlflow__registered_name="layerexit-tiny_decoder"))
    return {"lite": lite, "distill": distill, "adapters": adapters, "decoder": decoder}


def test_distillation_raises_agreement_more_than_ce_lite(runs):
    gains = {k: _gain(v) for k, v in runs.items() if k in ("lite", "distill")}
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


def _final_agreement(result) -> float:
    return sum(history(result, f"align/l{l:02d}")[-1] for l in EXITS) / len(EXITS)


def test_decoder_layer_adapters_agree_more_than_mlp_adapters_and_export_as_drafts(runs, workdir, tmp_path):  # noqa: F811
    """Same data, steps and learning rate; both start at the base model's exits (identity adapters)."""
    from transformers import AutoModelForCausalLM

    from layerexit.cli import main
    from layerexit.models.exits import decoder_parts
    from layerexit.models.loading import load_model_and_tokenizer

    dec, mlp = runs["decoder"], runs["adapters"]
    start = [history(dec, f"align/l{l:02d}")[0] for l in EXITS]
    assert start == [history(mlp, f"align/l{l:02d}")[0] for l in EXITS]  # identical starting exits
    assert _final_agreement(dec) > _final_agreement(mlp), (_final_agreement(dec), _final_agreement(mlp))
    os.environ["MLFLOW_TRACKING_URI"] = dec.tracking_uri
    model, tok = load_model_and_tokenizer("models:/layerexit-tiny_decoder@trained")
    assert {a.kind for a in decoder_parts(model).adapters.values()} == {"decoder_layer"}
    # The job chose a draft among exits <= 2, logged what it measured and shipped its settings with the model.
    from layerexit.models.draft_settings import draft_settings_of

    shipped = draft_settings_of(model)
    assert shipped["layer"] in (1, 2) and 1 <= shipped["num_draft"] <= 3 and shipped["draft_vocab"]
    assert history(dec, "draft/layer")[-1] == shipped["layer"]
    assert 0.0 <= history(dec, "draft/accept_pos1")[-1] <= 1.0
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig, SamplingParams

    prompt = tok("Repeat the words sea and sky.")["input_ids"]
    engine = EarlyExitEngine(model, set(), tok.pad_token_id)
    spec = engine.generate([prompt], ExitConfig(policy="self-speculative"), SamplingParams(max_new_tokens=8))[0]
    final = engine.generate([prompt], ExitConfig(), SamplingParams(max_new_tokens=8))[0]
    assert spec.token_ids == final.token_ids and set(spec.exit_layers) <= {shipped["layer"], 4}
    out = tmp_path / "draft"
    assert main(["export-draft", "models:/layerexit-tiny_decoder@trained", "--out", str(out), "--measure", "2"]) == 0
    draft = AutoModelForCausalLM.from_pretrained(out)
    assert draft.config.num_hidden_layers == shipped["layer"] + 1
    import mlflow

    version = mlflow.MlflowClient().get_model_version_by_alias("layerexit-tiny_decoder-draft", "trained")
    assert version.tags["layerexit.draft.layer"] == str(shipped["layer"])
    assert 0.0 <= float(version.tags["layerexit.draft.agreement"]) <= 1.0
