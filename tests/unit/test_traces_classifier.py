"""Traces along the final greedy path, the AdaInfer classifier trained on them, and the engine CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerexit.cli import main
from layerexit.engine.classifier import classifier_exit_decisions, train_exit_classifier
from layerexit.engine.decode import EarlyExitEngine
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.reference import hf_greedy_generate
from layerexit.engine.thresholds import ThresholdsFile, load_thresholds_file
from layerexit.engine.traces import ExitTraces, record_traces
from layerexit.models.exits import early_exit_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [20, 21, 22]]


def test_traces_match_early_exit_logits(tiny_model, tmp_path):
    responses = hf_greedy_generate(tiny_model, PROMPTS, 6, 0, set())
    traces = record_traces(tiny_model, PROMPTS, responses, [1, 3], show_progress=False)
    assert traces.layers == [1, 3, 4]
    assert traces.top1.shape == (24, 3) and traces.context.tolist()[:6] == list(range(7, 13))
    assert traces.final_top1.tolist()[:6] == responses[0]  # the final layer's greedy path
    ids = torch.tensor([PROMPTS[0] + responses[0]])
    with torch.no_grad():
        probs = early_exit_logits(tiny_model, ids, 3)[0, 6:12].softmax(-1)
    assert np.allclose(traces.conf[:6, 1], probs.max(-1).values.numpy(), atol=1e-5)
    assert (traces.agrees()[:, -1]).all()
    traces.save(tmp_path / "t.npz")
    assert ExitTraces.load(tmp_path / "t.npz").layers == [1, 3, 4]


def test_classifier_respects_min_precision_and_drives_the_engine(tiny_model, tmp_path):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (6,), generator=g).tolist() for _ in range(12)]
    responses = hf_greedy_generate(tiny_model, prompts, 8, 0, set())
    traces = record_traces(tiny_model, prompts, responses, [1, 2, 3], show_progress=False)
    clf = train_exit_classifier(traces, min_precision=0.8)
    decisions = classifier_exit_decisions(clf, traces)
    agree = traces.agrees()[:, :-1]
    for j in range(3):
        if decisions[:, j].any():
            assert agree[decisions[:, j], j].mean() >= 0.8
    path = ThresholdsFile(model="tiny", num_layers=4, exit_layers=[1, 2, 3], policy="classifier",
                          classifier=clf).save(tmp_path / "clf.json")
    loaded = load_thresholds_file(path)
    assert loaded.classifier.coef.keys() == {1, 2, 3}
    out = EarlyExitEngine(tiny_model, set(), 0).generate(
        prompts[:3], ExitConfig(policy="classifier", thresholds=str(path)), SamplingParams(max_new_tokens=5))
    assert all(len(r.token_ids) == 5 for r in out)


def test_generate_cli_json(tiny_dir, prompts_file, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--policy", "confidence",
               "--thresholds", "1:0.01,2:0.01,3:0.01", "--max-new-tokens", "5", "--json", "--batch-size", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert {"text", "token_ids", "exit_layers", "flops", "flops_full", "seconds"} <= row.keys()
        assert len(row["exit_layers"]) == len(row["token_ids"]) <= 5
        assert row["flops"] > 0 and row["flops_full"] > 0


def test_bench_cli_reports_ratios(tiny_dir, prompts_file, capsys):
    rc = main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--policies",
               "final,fixed,self-speculative", "--layer", "2", "--max-new-tokens", "4", "--json", "--dtype", "float32",
               "--bandwidth-mib", "64"])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"hf-generate", "weights loop (eager F.linear)", "floor (memory bandwidth)", "final",
                         "fixed/recompute", "self-speculative",
                         *(f"replay (free perfect draft) k={k}" for k in range(1, 6))}
    assert rows["final"]["agreement"] == 1.0 and rows["self-speculative"]["identical"] == 1.0
    # The free perfect draft is accepted whole: acceptance 1 at every position it drafted.
    assert all(a == 1.0 for a in rows["replay (free perfect draft) k=3"]["acceptance"])
    assert rows["hf-generate"]["agreement"] == 1.0  # engine `final` equals transformers generate
    assert rows["fixed/recompute"]["flops_ratio"] < 1.0
    assert rows["final"]["flops_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "warp"], "unknown policy"),
        (["--thresholds", "2:1.5", "--policy", "confidence"], "thresholds must be in"),
        (["--thresholds", "9:0.5", "--policy", "confidence"], "not intermediate layers"),
        (["--kv", "magic"], "unknown KV strategy"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_generate_cli_bad_input(tiny_dir, capsys, args, message):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_classifier_cli(tiny_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "clf.yaml"
    assert main(["train-classifier", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--out", str(out),
                 "--exit-layers", "1,2,3", "--max-new-tokens", "6"]) == 0
    tf = load_thresholds_file(out)
    assert tf.policy == "classifier" and tf.num_layers == 4 and set(tf.classifier.coef) == {1, 2, 3}
    assert main(["train-classifier", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--out", str(out),
                 "--exit-layers", "1,9"]) == 2


def test_probe_policy_checks_cost_a_dot_product_not_a_head(tiny_model, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    from layerexit.engine.classifier import train_exit_probe
    from layerexit.models.tiny import build_tiny_llama

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (6,), generator=g).tolist() for _ in range(10)]
    responses = hf_greedy_generate(tiny_model, prompts, 8, 0, set())
    traces = record_traces(tiny_model, prompts, responses, [1, 2, 3], show_progress=False, keep_hidden=True)
    assert traces.hidden.shape == (80, 4, 64)
    probe, table = train_exit_probe(traces, min_precision=0.5)
    path = ThresholdsFile(model="tiny", num_layers=4, exit_layers=[1, 2, 3], policy="probe", thresholds=table,
                          probe=probe).save(tmp_path / "new" / "dir" / "probe.yaml")  # creates parents
    model = build_tiny_llama(num_layers=4)
    model.config._attn_implementation = "eager"
    engine = EarlyExitEngine(model, set(), 0)
    cfg = ExitConfig(policy="probe", thresholds=str(path))
    with FlopCounterMode(display=False) as counter:
        out = engine.generate(prompts[:3], cfg, SamplingParams(max_new_tokens=6))
    assert abs(sum(r.flops + r.prefill_flops for r in out) - counter.get_total_flops()) / counter.get_total_flops() < 0.01
    never = {l: 1.0 for l in (1, 2, 3)}
    ref = engine.generate(prompts[:3], ExitConfig(policy="probe", probe=probe, thresholds=never),
                          SamplingParams(max_new_tokens=6))
    final = engine.generate(prompts[:3], ExitConfig(), SamplingParams(max_new_tokens=6))
    assert [r.token_ids for r in ref] == [r.token_ids for r in final]
    # Checks that never exit cost only probes: 3 * 2H per token more than the final layer, not 3 heads.
    from layerexit.engine.flops import FlopsModel

    fm = FlopsModel.from_config(model.config)
    assert ref[0].flops - final[0].flops == 6 * 3 * fm.probe(1)
