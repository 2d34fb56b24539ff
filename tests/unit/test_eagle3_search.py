"""The EAGLE-3 draft search (``tuning/eagle3_search.py``, ``draft: eagle3`` in ``jobs/tune_draft.py``): pruning the
draft head to its most emitted ids keeps exactly those rows, the (N, k) score is tau(k) / (1 + k c) with the pruned
head's cost, bad settings name the field, and the whole job on a tiny model that ships a draft (Ray Tune trials, our
engine's real decode identical to `final` in fp32, the pruned export vLLM's layout, the engine Serve config
rewritten)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml

from layerexit.errors import ConfigError
from layerexit.models.eagle3 import Eagle3Draft, Eagle3Spec, is_eagle3_dir, load_eagle3
from layerexit.training.eagle3_recipe import heldout_features
from layerexit.tuning.eagle3_search import (FULL, Eagle3TrialInputs, emitted_counts, evaluate_point,
                                            is_eagle3_config, prune_vocab)

AUX = (1, 2, 3)


def _draft(model, size: int, seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    spec = Eagle3Spec.for_target(model.config, aux_layers=AUX, draft_vocab_size=size)
    draft = Eagle3Draft(spec, model.get_input_embeddings())
    for p in draft.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    draft.set_vocab(torch.randperm(model.config.vocab_size)[:size])
    return draft.eval()


def test_pruned_head_keeps_the_most_emitted_ids_with_their_rows(tiny_model):
    draft = _draft(tiny_model, 40)
    ids = draft.draft_to_target.tolist()
    counts = torch.zeros(tiny_model.config.vocab_size, dtype=torch.long)
    favourites = [ids[7], ids[3], ids[30]]
    for rank, t in enumerate(favourites):
        counts[t] = 10 - rank
    small = prune_vocab(draft, 3, counts)
    assert small.spec.draft_vocab_size == 3
    assert small.draft_to_target.tolist() == sorted(favourites)
    assert small.t2d.sum() == 3 and all(small.t2d[t] for t in favourites)
    # Each kept id's head row is the trained one: the pruned logits are the full logits at those ids.
    h = torch.randn(2, 5, draft.spec.hidden_size)
    full = draft.lm_head(h)
    keep = [ids.index(t) for t in sorted(favourites)]
    torch.testing.assert_close(small.lm_head(h), full[..., keep])
    assert prune_vocab(draft, FULL, counts) is draft and prune_vocab(draft, 40, counts) is draft
    with pytest.raises(ConfigError, match="space.draft_vocab"):
        prune_vocab(draft, 41, counts)


def _inputs(model, draft, k: int) -> Eagle3TrialInputs:
    torch.manual_seed(1)
    examples = [SimpleNamespace(input_ids=torch.randint(4, 60, (n,)).tolist(), prompt_len=3) for n in (14, 18)]
    sequences = heldout_features(model, examples, AUX)
    parts_bytes = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
    parts_bytes += model.lm_head.weight.numel() + model.model.norm.weight.numel()
    counts = emitted_counts([s.greedy.tolist() for s in sequences], model.config.vocab_size)
    state = {n: v.detach().clone() for n, v in draft.state_dict().items()}
    return Eagle3TrialInputs(state, draft.spec, model.get_input_embeddings().weight.detach(), counts, sequences,
                             parts_bytes, k)


def test_a_point_scores_tau_over_its_cost(tiny_model):
    draft = _draft(tiny_model, 48)
    inputs = _inputs(tiny_model, draft, 3)
    full = evaluate_point(inputs, FULL, 3)
    small = evaluate_point(inputs, 8, 3)
    assert small["cost_ratio"] < full["cost_ratio"]
    for point in (full, small):
        assert point["predicted_speedup"] == pytest.approx(point["tau"] / (1 + 3 * point["cost_ratio"]))
        assert 1.0 <= point["tau"] <= 4.0 and point["starts"] > 0
    assert evaluate_point(inputs, FULL, 1)["cost_ratio"] == full["cost_ratio"]


def test_eagle3_configs_are_recognised_and_validated(tmp_path):
    from layerexit.config import load_config
    from layerexit.tuning.eagle3_search import Eagle3TuneConfig

    assert is_eagle3_config("tune/smollm2_eagle3.yaml") and not is_eagle3_config("tune/smollm2_draft.yaml")
    cfg = load_config(Eagle3TuneConfig, "tune/smollm2_eagle3.yaml", [])
    assert cfg.model.spec == "models:/layerexit-smollm2_eagle3@trained" and cfg.space.ks == [1, 2, 3, 4, 5]
    for override, field in (("space.draft_vocab=[0]", "space.draft_vocab"), ("space.num_draft=[0,3]",
                                                                              "space.num_draft")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(Eagle3TuneConfig, "tune/smollm2_eagle3.yaml", [override])


@pytest.fixture()
def shipped_dir(tiny_dir, tmp_path):
    from layerexit.models.draft_settings import write_draft_settings
    from layerexit.models.eagle3 import save_eagle3
    from layerexit.models.loading import load_model_and_tokenizer

    out = tmp_path / "model"
    shutil.copytree(tiny_dir, out)
    model, _ = load_model_and_tokenizer(str(out))
    save_eagle3(_draft(model, model.config.vocab_size // 2), out / "eagle3", dtype=torch.float32)
    write_draft_settings(out, {"draft": "eagle3", "num_draft": 2})
    return out


def _config(model_dir, tmp_path, **over):
    from layerexit.config import load_config
    from layerexit.tuning.eagle3_search import Eagle3TuneConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Write a poem.", "Add two and two.", "Name a colour.", "Say hello."]))
    doc = {"draft": "eagle3", "model": str(model_dir), "dtype": "float32", "device": "cpu",
           "space": {"num_draft": [1, 3], "draft_vocab": [8, "full"]},
           "trials": {"trial_cpus": 1, "max_concurrent": 1, "verbose": 0},
           "prompts": {"validation": {"file": str(prompts), "limit": 2},
                       "report": {"file": str(prompts), "offset": 2, "limit": 2},
                       "max_new_tokens": 8, "batch_size": 2},
           "confirm": {"vllm": False}, "mlflow": {"enabled": False}, "output_dir": str(tmp_path / "out"), **over}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(Eagle3TuneConfig, path, [])


def test_a_head_larger_than_the_trained_one_or_a_model_without_a_draft_is_refused(shipped_dir, tiny_dir, tmp_path):
    from layerexit.tuning.eagle3_search import run_eagle3_tuning

    with pytest.raises(ConfigError, match="space.draft_vocab"):
        run_eagle3_tuning(_config(shipped_dir, tmp_path, space={"draft_vocab": [100000]}))
    with pytest.raises(ConfigError, match="model.spec"):
        run_eagle3_tuning(_config(tiny_dir, tmp_path))


def test_an_engine_serve_config_is_rewritten_to_draft_with_the_shipped_head(tmp_path, shipped_dir):
    from layerexit.tuning.eagle3_search import check_serve_target, rewrite_eagle3_serve

    serve = tmp_path / "serve.yaml"
    shutil.copy("serve_configs/smollm2.yaml", serve)
    rewrite_eagle3_serve(serve, "shipped", 3, None, "tuned")
    apps = yaml.safe_load(serve.read_text())["applications"]
    blocks = [d["user_config"] for a in apps for d in a.get("deployments", []) if "user_config" in d]
    assert any(b.get("policy") == "self-speculative" and b.get("draft") == "eagle3" and b.get("num_draft") == 3
               for b in (b.get("early_exit", b) for b in blocks)), blocks
    with pytest.raises(ConfigError, match="space.draft_vocab"):
        check_serve_target(serve, _config(shipped_dir, tmp_path))  # [8, full] cannot go into an engine config
    with pytest.raises(ConfigError, match="pruned head"):
        rewrite_eagle3_serve(serve, "/some/dir", 3, None, "tuned")


@pytest.mark.slow
def test_the_search_decodes_its_choice_identically_and_exports_it(shipped_dir, tmp_path):
    """Ray Tune over (N, k), the choice decoded by our engine (fp32: answers equal to `final`'s) and exported (a
    pruned head in vLLM's EAGLE-3 layout)."""
    from layerexit.tuning.eagle3_search import run_eagle3_tuning

    cfg = _config(shipped_dir, tmp_path, export={"min_speedup": 0.0, "draft_dir": str(tmp_path / "pruned")})
    out = run_eagle3_tuning(cfg)
    assert len(out.trials) == 6 and not out.failed
    assert {(t["draft_vocab"], t["num_draft"]) for t in out.trials} == {(n, k) for n in (8, FULL) for k in (1, 2, 3)}
    chosen = out.chosen
    assert chosen["predicted_speedup"] == max(t["predicted_speedup"] for t in out.trials)
    assert out.engine["identical"] == out.engine["prompts"] == 2
    assert len(out.engine["acceptance_per_position"]) == chosen["num_draft"]
    if chosen["draft_vocab"] == 8:
        assert is_eagle3_dir(out.draft_dir) and load_eagle3(out.draft_dir).spec.draft_vocab_size == 8
    else:
        assert out.draft_dir == str(shipped_dir / "eagle3")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["chosen"]["num_draft"] == chosen["num_draft"]
