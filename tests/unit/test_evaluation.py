"""Evaluation report on the tiny model: every table and figure, final vs final, FLOPs of a known exit pattern,
MLflow logging, and bad inputs (missing/empty prompt sets, thresholds made for another model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerexit.config import load_config
from layerexit.data.prompts import format_prompt
from layerexit.engine.flops import FlopsModel
from layerexit.errors import ConfigError, InputFileError
from layerexit.evaluation.config import EvalConfig, EvalMethod, PromptSetConfig
from layerexit.evaluation.mlflow_report import METRIC_FIELDS
from layerexit.evaluation.prompt_sets import load_prompt_set, read_prompt_jsonl, record_to_prompt
from layerexit.evaluation.report import run_evaluation
from layerexit.evaluation.similarity import spacy_similarities, token_agreement

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
PROMPTS = [
    {"prompt": "Write a short poem about the sea.", "category": "writing"},
    {"prompt": "What is two plus two?", "category": "math"},
    {"prompt": "Explain why the sky is blue.", "category": "science"},
]
MAX_NEW = 6


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a busy shared CPU two OpenMP threads are ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompt_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def evaluated(tiny_model_and_tokenizer, tiny_dir, tmp_path_factory):
    """One evaluation of the tiny model with every kind of method, logged to a throwaway MLflow store."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(
        model=str(tiny_dir),
        prompt_sets=[PromptSetConfig(name="tiny", path=str(_prompt_file(tmp / "p.jsonl")))],
        methods=[
            EvalMethod(name="final", policy="final"),
            EvalMethod(name="exit-first", policy="confidence", thresholds={1: 0.0}),
            EvalMethod(name="exit-first-nokv", policy="confidence", thresholds={1: 0.0}, kv="none"),
            EvalMethod(name="sequential", policy="sequential", thresholds={1: 0.9, 2: 0.9}),
            EvalMethod(name="random", policy="random", thresholds={1: 0.9, 2: 0.9}),
            EvalMethod(name="fixed-2", policy="fixed", layer=2),
        ],
        max_new_tokens=MAX_NEW,
        reuse_reference=False,  # `final` is generated again, so final-vs-final really compares two runs
        output_dir=str(tmp / "out"),
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test-eval"},
        show_progress=False,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's default artifact root (./mlruns) lands in tmp
        report = run_evaluation(cfg, model_and_tokenizer=tiny_model_and_tokenizer)
    return report, cfg


def test_report_holds_every_table_and_figure(evaluated):
    report, cfg = evaluated
    md = report.markdown_path.read_text()
    for heading in ("Table 1", "Table 2", "Table 6", "Figure 8", "Figures 9-10", "Figures 5-6", "## Methods"):
        assert heading in md, heading
    for key in ("cost_quality", "tokens", "exit_share", "categories_tiny", "alignment"):
        path = report.figures[key]
        assert path.read_bytes()[:8] == PNG
        assert f"]({path.name})" in md
    data = json.loads(report.json_path.read_text())
    block = data["prompt_sets"]["tiny"]
    assert block["num_prompts"] == 3
    assert list(block["methods"]) == [m.name for m in cfg.methods]
    for name, summary in block["methods"].items():
        missing = [f for f in METRIC_FIELDS if f not in summary]
        assert not missing, (name, missing)
        assert len(summary["per_prompt"]) == 3
        assert set(summary["categories"]) == {"writing", "math", "science"}
        assert all(c["prompts"] == 1 for c in summary["categories"].values())
        assert summary["judge_status"] == "not run"
        assert 0 < summary["tokens_mean"] <= MAX_NEW
        assert summary["tokens_per_s"] > 0
        assert sum(summary["exit_share"].values()) == pytest.approx(1.0)
    assert [r["layer"] for r in data["alignment"][cfg.model]["rows"]] == [1, 2, 3, 4]
    lines = (report.out_dir / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 3 * (1 + len(cfg.methods))  # reference + every method, each prompt


def test_final_vs_final_is_identical_and_free(evaluated):
    s = evaluated[0].summary()["final"]
    assert s["similarity_spacy"] == pytest.approx(1.0, abs=1e-6)
    assert s["similarity_embedding"] == pytest.approx(1.0, abs=1e-5)
    assert s["token_agreement"] == 1.0 and s["exact_match_rate"] == 1.0
    assert s["cost_improvement_pct"] == 0.0 and s["token_cost_improvement_pct"] == 0.0
    assert s["exit_share"] == {4: 1.0}
    assert s["tokens_mean"] == s["reference_tokens_mean"]


def test_threshold_zero_at_first_exit_costs_what_flops_model_predicts(evaluated, tiny_model_and_tokenizer):
    """Every token exits at layer 1; the report's FLOPs equal the FLOPs model's count for that pattern."""
    report, _ = evaluated
    model, tok = tiny_model_and_tokenizer
    F = FlopsModel.from_config(model.config)
    L = model.config.num_hidden_layers
    summaries = report.summary()
    ref_rows = summaries["final"]["per_prompt"]
    rows = summaries["exit-first"]["per_prompt"]
    rows_nokv = summaries["exit-first-nokv"]["per_prompt"]
    pred_total = ref_total = nokv_total = nokv_ref_total = 0
    for p, row, row_nokv, ref in zip(PROMPTS, rows, rows_nokv, ref_rows, strict=True):
        P = len(format_prompt(tok, p["prompt"]))
        n, n_ref = row["tokens"], ref["tokens"]
        assert row["exit_layers"] == [1] * n
        # KV cache (recompute): full-depth prefill, then layer 1 + one head check per token.
        pred = L * F.layer(P, P) + F.head(1) + sum(F.layer(1, P + s) + F.head(1) for s in range(1, n))
        ref_pred = L * F.layer(P, P) + F.head(1) + sum(L * F.layer(1, P + s) + F.head(1) for s in range(1, n_ref))
        assert row["flops"] == pred
        assert row["reference_flops"] == ref["flops"] == ref_pred
        # No cache (the paper's setting): every token re-runs the prefix through layer 1 only.
        m = row_nokv["tokens"]
        pred_nokv = sum(F.layer(P + i, P + i) + F.head(1) for i in range(m))
        assert row_nokv["flops"] == pred_nokv
        nokv_ref = row_nokv["reference_flops"]
        assert nokv_ref == sum(L * F.layer(P + i, P + i) + F.head(1) for i in range(n_ref))
        pred_total += pred
        ref_total += ref_pred
        nokv_total += pred_nokv
        nokv_ref_total += nokv_ref
    assert summaries["exit-first"]["cost_improvement_pct"] == pytest.approx(100 * (1 - pred_total / ref_total))
    assert summaries["exit-first-nokv"]["cost_improvement_pct"] == pytest.approx(
        100 * (1 - nokv_total / nokv_ref_total))
    assert summaries["exit-first"]["exit_share"] == {1: 1.0}


def test_baselines_follow_their_schedule(evaluated):
    s = evaluated[0].summary()
    seq = s["sequential"]["per_prompt"][0]["exit_layers"]
    assert seq == [[1, 2, 4][i % 3] for i in range(len(seq))]
    assert set(s["random"]["exit_share"]) <= {1, 2, 4}
    schedules = {tuple(r["exit_layers"][:5]) for r in s["random"]["per_prompt"]}
    assert len(schedules) > 1  # each prompt draws its own random exits (seed per batch), deterministically
    assert s["fixed-2"]["exit_share"] == {2: 1.0}
    assert s["fixed-2"]["cost_improvement_pct"] > 0  # two of four layers, one head per token


def test_mlflow_run_with_nested_runs_and_stable_metric_names(evaluated):
    from mlflow import MlflowClient

    report, cfg = evaluated
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    parent = client.get_run(report.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["tiny/exit-first/cost_improvement_pct"] == pytest.approx(
        report.summary()["exit-first"]["cost_improvement_pct"])
    assert parent.data.metrics["tiny/final/similarity_spacy"] == pytest.approx(1.0, abs=1e-6)
    assert "alignment/" + cfg.model.replace("/", "_") + "/layer_04" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(m.name for m in cfg.methods)
    child = next(r for r in children if r.info.run_name == "fixed-2")
    assert child.data.params["policy"] == "fixed" and child.data.params["layer"] == "2"
    assert child.data.metrics["tiny/exit_share/layer_02"] == 1.0
    # the one-glance figure is the run's first artifact
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "0-overview")] == [
        "0-overview/cost_quality.png"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.json", "report/alignment.png"} <= artifacts


# ----------------------------------------------------------------------------------------------- bad inputs
def _cfg(tmp_path, **kw) -> EvalConfig:
    base = dict(model="/nonexistent/model", methods=[EvalMethod(name="final", policy="final")],
                output_dir=str(tmp_path / "out"), mlflow={"enabled": False}, show_progress=False,
                alignment={"enabled": False}, similarity={"spacy": False, "embedding": False}, max_new_tokens=2)
    base.update(kw)
    return EvalConfig(**base)


def test_missing_prompt_set_fails_before_loading_the_model(tmp_path):
    cfg = _cfg(tmp_path, prompt_sets=[PromptSetConfig(name="mine", path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(InputFileError, match="prompt set file not found"):
        run_evaluation(cfg)  # the model path does not exist either: the prompt set is checked first


def test_empty_and_unknown_prompt_sets(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputFileError, match="holds no prompts"):
        run_evaluation(_cfg(tmp_path, prompt_sets=[PromptSetConfig(name="e", path=str(empty))]))
    with pytest.raises(InputFileError, match="unknown prompt set 'mystery'"):
        load_prompt_set(PromptSetConfig(name="mystery"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"answer": "no text"}\n')
    with pytest.raises(InputFileError, match=r"bad.jsonl:2: no non-empty text field"):
        read_prompt_jsonl(bad)


def test_paper_set_unreachable_names_the_local_file_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputFileError, match=r"prompt set 'vicuna'.*path: /path/to/vicuna.jsonl"):
        load_prompt_set(PromptSetConfig(name="vicuna"))


def test_thresholds_file_for_another_model_is_rejected(tmp_path, tiny_model_and_tokenizer):
    from layerexit.engine.thresholds import ThresholdsFile

    thr = ThresholdsFile(model="llama-2-7b", num_layers=32, exit_layers=[8, 16],
                         thresholds={8: 0.9, 16: 0.8}).save(tmp_path / "thr.yaml")
    cfg = _cfg(tmp_path, prompt_sets=[PromptSetConfig(name="p", path=str(_prompt_file(tmp_path / "p.jsonl")))],
               methods=[EvalMethod(name="final", policy="final"),
                        EvalMethod(name="tuned", policy="confidence", thresholds=str(thr))])
    with pytest.raises(ConfigError, match=r"method 'tuned': thresholds file was made for llama-2-7b with 32 layers"):
        run_evaluation(cfg, model_and_tokenizer=tiny_model_and_tokenizer)
    assert not (tmp_path / "out" / "report.md").exists()


def test_config_validation_and_kv_default(tmp_path):
    with pytest.raises(ConfigError, match="methods names must be unique, repeated: a"):
        load_config(EvalConfig, _yaml(tmp_path, "methods: [{name: a}, {name: a, policy: fixed, layer: 2}]\n"))
    with pytest.raises(ConfigError, match="methods.0.treshold: unknown key"):
        load_config(EvalConfig, _yaml(tmp_path, "methods: [{name: a, treshold: 0.5}]\n"))
    with pytest.raises(ConfigError, match="policy 'fixed' needs `layer`"):
        load_config(EvalConfig, _yaml(tmp_path, "methods: [{name: a, policy: fixed}]\n"))
    cfg = load_config(EvalConfig, _yaml(tmp_path, "kv: none\nmethods: [{name: a}, {name: b, kv: propagate}]\n"))
    assert cfg.methods[0].exit_config(cfg.kv).kv == "none"
    assert cfg.methods[1].exit_config(cfg.kv).kv == "propagate"


def test_shipped_eval_config_loads_and_covers_the_paper():
    path = REPO / "jobs" / "configs" / "eval_smollm2.yaml"
    assert path.read_text().startswith("# python jobs/evaluate.py --config jobs/configs/eval_smollm2.yaml")
    cfg = load_config(EvalConfig, path, ["max_new_tokens=16"])
    assert cfg.max_new_tokens == 16 and cfg.model == "smollm2"
    policies = {m.policy for m in cfg.methods}
    assert {"final", "confidence", "random", "random-uniform", "sequential", "fixed"} <= policies
    assert {m.thresholds for m in cfg.methods if m.policy == "confidence"} == {"paper-7b", "paper-7b-aggressive"}
    for m in cfg.methods:
        m.exit_config(cfg.kv).build_policy(30)  # valid on SmolLM2's 30 layers


def test_job_script_bad_input_is_one_line_exit_2(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    yaml_path = _yaml(tmp_path, f"prompt_sets: [{{name: x, path: {tmp_path / 'missing.jsonl'}}}]\n"
                                "methods: [{name: final}]\nmlflow: {enabled: false}\n")
    assert job.main(["--config", str(yaml_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: prompt set file not found") and "\n" not in err


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------- metrics, prompts
def test_token_agreement_and_spacy_similarity():
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]).agreement == 0.75
    a = token_agreement([1, 2, 3, 4], [1, 2])
    assert a.agreement == 0.5 and a.prefix == 0.5 and not a.exact
    assert token_agreement([], []).exact
    same, close, far, empty = spacy_similarities(
        ["The cat sat on the mat.", "The cat sat on the mat.", "The cat sat on the mat.", ""],
        ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue grew by 4%.", "text"],
    )
    assert same == pytest.approx(1.0, abs=1e-6)
    assert 0 < far < close < 1
    assert empty == 0.0


def test_records_of_the_paper_schemas():
    vicuna = record_to_prompt({"question_id": 1, "category": "generic", "turns": ["How do I sleep better?"]}, "v")
    assert vicuna.prompt == "How do I sleep better?" and vicuna.category == "generic" and vicuna.extra["id"] == 1
    si = record_to_prompt({"id": "u1", "motivation_app": "Gmail", "instruction": "Reply politely.",
                           "instances": {"input": ["Can we meet?"], "output": ["Sure."]}}, "s")
    assert si.prompt == "Reply politely.\n\nCan we meet?" and si.category == "Gmail"
    held = load_prompt_set(PromptSetConfig(limit=5))
    assert len(held) == 5 and len({p.category for p in held}) == 5  # a quick run spreads over categories
    assert held[0].prompt == load_prompt_set(PromptSetConfig())[0].prompt


# ------------------------------------------------------------------------------------- entry points
def test_eval_command_prints_headline_and_returns_paths(tmp_path, tiny_dir):
    from rich.console import Console

    from layerexit.evaluation.cli_eval import eval_command

    prompts = _prompt_file(tmp_path / "p.jsonl")
    yaml_path = _yaml(tmp_path, f"model: {tiny_dir}\nprompt_sets: [{{name: mine, path: {prompts}}}]\n"
                                "methods: [{name: final}, {name: exit-1, policy: confidence, thresholds: {1: 0.0}}]\n"
                                "alignment: {enabled: false}\nshow_progress: false\n")
    console = Console(record=True, width=200)
    out = eval_command(yaml_path, ["max_new_tokens=3"], output_dir=str(tmp_path / "o"), limit=2, no_mlflow=True,
                       console=console)
    text = console.export_text()
    assert "Early exit vs final layer on mine (2 prompts)" in text and "exit-1" in text
    rows = {r["method"]: r for r in out["headline"]["mine"]}
    assert rows["final"]["cost_improvement_pct"] == 0.0 and rows["exit-1"]["cost_improvement_pct"] > 0
    assert Path(out["report"]).is_file() and out["mlflow_run_id"] is None


def test_demo_stage_prints_the_headline_table(tmp_path, tiny_dir, tiny_model_and_tokenizer):
    from rich.console import Console

    from layerexit.engine.options import ExitConfig
    from layerexit.evaluation.demo_stage import run_demo_eval

    console = Console(record=True, width=200)
    result = run_demo_eval(console, str(tiny_dir),
                           {"final": ExitConfig(policy="final"),
                            "lite": ExitConfig(policy="confidence", thresholds={1: 0.0, 2: 0.5})},
                           tmp_path / "demo", limit=2, max_new_tokens=3,
                           model_and_tokenizer=tiny_model_and_tokenizer, show_progress=False)
    text = console.export_text()
    assert "cost impr. %" in text and "spaCy sim" in text and "lite" in text
    assert [r["method"] for r in result["headline"]] == ["final", "lite"]
    assert result["headline"][0]["similarity_spacy"] == pytest.approx(1.0, abs=1e-6)
    assert Path(result["report"]).is_file()
