"""The draft search's pieces (issue 22, "Tune picks the draft"): config validation, acceptance replayed on traces
against real engine decoding, scores against ``draft_choice``, Serve config export, the job script. Tiny models,
no Ray, seconds."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml

from layerexit.config import load_config
from layerexit.errors import ConfigError, LayerexitError
from layerexit.tuning.draft_config import DraftTuneConfig

REPO = Path(__file__).resolve().parents[2]
DRAFT_YAMLS = sorted((REPO / "tune").glob("*_draft.yaml"))
SMOLLM2 = REPO / "tune" / "smollm2_draft.yaml"


def _job():
    spec = importlib.util.spec_from_file_location("tune_draft_job", REPO / "jobs" / "tune_draft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prompts(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (length,), generator=g).tolist() for length in (5, 9, 7, 12, 6)[:n]]


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("path", DRAFT_YAMLS, ids=lambda p: p.name)
def test_every_draft_yaml_loads(path):
    cfg = load_config(DraftTuneConfig, path)
    assert path.read_text().startswith("# ")  # opens with its launch command
    assert cfg.space.size == len(cfg.space.layers) * len(cfg.space.ks)


@pytest.mark.parametrize("override, message", [
    ("space.layers=[]", "space.layers"),
    ("space.layers=[0,8]", "space.layers"),
    ("space.layers=[8,8]", "unique"),
    ("space.num_draft=[3,1]", "space.num_draft"),
    ("space.num_draft=[1,17]", "space.num_draft"),
    ("trials.measure=exact", "trials.measure"),
    ("trials.max_concurent=2", "unknown key"),
    ("confirm.dtype=int8", "confirm.dtype"),
    ("export.min_speedup=-1", "export.min_speedup"),
    ("prompts.report={split: train, offset: 4, limit: 8}", "overlap"),
    ("prompts.report.limit=0", "prompts.report.limit"),
])
def test_bad_config_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DraftTuneConfig, SMOLLM2, [override])


def test_layers_must_be_below_the_models_depth():
    cfg = load_config(DraftTuneConfig, SMOLLM2, ["space.layers=[8,30]"])
    with pytest.raises(ConfigError, match=r"space.layers: \[30\] not below the model's 30 layers"):
        cfg.space.check(30)
    assert cfg.space.check(31).layers == [8, 30]


# ------------------------------------------------------------------------------------------ acceptance
def test_simulated_acceptance_is_what_the_engine_measures():
    """Replaying drafting on a teacher-forced trace gives measure_acceptance's counts exactly (fp32), EOS cuts
    included."""
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig, SamplingParams
    from layerexit.engine.traces import record_traces
    from layerexit.models.tiny import build_tiny_llama
    from layerexit.tuning.draft_choice import measure_acceptance
    from layerexit.tuning.draft_search import simulate_acceptance, trace_matches

    model = build_tiny_llama(num_layers=4)
    prompts, mx = _prompts(), 16
    plain = [r.token_ids for r in EarlyExitEngine(model, set(), 0).generate(prompts, ExitConfig(policy="final"),
                                                                            SamplingParams(max_new_tokens=mx))]
    eos = {plain[0][7], plain[2][4]}  # two answers end early, at tokens the model really emits
    engine = EarlyExitEngine(model, eos, 0)
    answers = [r.token_ids for r in engine.generate(prompts, ExitConfig(policy="final"),
                                                    SamplingParams(max_new_tokens=mx))]
    assert min(len(a) for a in answers) < mx == max(len(a) for a in answers)
    traces = record_traces(model, prompts, answers, [1, 2, 3], show_progress=False)
    matches = trace_matches(traces, answers, [1, 2, 3])
    ended = [a[-1] in eos for a in answers]
    for layer in (1, 2, 3):
        for k in (1, 2, 4):
            want = measure_acceptance(engine, prompts, layer, k, mx, batch_size=2)
            got = simulate_acceptance(matches[layer], ended, layer, k, mx)
            assert got.to_dict() == want.to_dict(), (layer, k)
    assert 0 < measure_acceptance(engine, prompts, 1, 2, mx).acceptance < 1


def test_simulation_by_hand():
    from layerexit.tuning.draft_search import simulate_acceptance

    # token 0 from the prefill; k=2 blocks start at 1: [T, T] -> 2 accepted + 1; at 4: [F] -> 0 + 1;
    # at 5: [T, F] -> 1 + 1; at 7: one draft left before max_new_tokens=9 ([T]) -> 1 + 1 = 9 tokens
    s = simulate_acceptance([[False, True, True, True, False, True, False, True, True]], [False], 3, 2, 9)
    assert (s.steps, s.drafted, s.accepted) == (4, 7, 4)
    assert s.per_position == [3 / 4, 1 / 2] and s.tokens_per_verification == 2.0
    # the same answer ending in EOS: the step that emits it is not counted
    e = simulate_acceptance([[False, True, True, True, False, True, False, True, True]], [True], 3, 2, 9)
    assert (e.steps, e.drafted, e.accepted) == (3, 6, 3)


def test_search_scores_match_draft_choice_on_the_same_numbers():
    """Trials scored from acceptance measured at the longest k pick draft_choice.choose_draft's k and speedup."""
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.models.tiny import build_tiny_llama
    from layerexit.tuning.draft_choice import (choose_draft, draft_cost_ratio, expected_tokens, measure_acceptance,
                                               predicted_speedup)
    from layerexit.tuning.draft_search import best_point, layer_rows, score_point

    model = build_tiny_llama(num_layers=4)
    engine = EarlyExitEngine(model, set(), 0)
    prompts = _prompts(4)
    best, rows = choose_draft(model, engine, prompts, [1, 2, 3], max_draft=3, max_new_tokens=12)
    trials = []
    for layer in (1, 2, 3):
        stats = measure_acceptance(engine, prompts, layer, 3, 12)
        c = draft_cost_ratio(model, layer)
        for k in (1, 2, 3):
            point = score_point(stats, c, k)
            assert point["predicted_speedup"] == pytest.approx(predicted_speedup(stats.per_position, c, k))
            assert point["expected_tokens"] == pytest.approx(expected_tokens(stats.per_position, k))
            assert point["measured_at_k"] == 3 and point["cost_ratio"] == c
            trials.append({**point, "per_position": stats.per_position[:k]})
    mine = layer_rows(trials)
    assert [(r.layer, r.num_draft) for r in mine] == [(r.layer, r.num_draft) for r in rows]
    assert [r.predicted_speedup for r in mine] == pytest.approx([r.predicted_speedup for r in rows])
    assert [r.stats.per_position for r in mine] == [r.stats.per_position for r in rows]
    chosen = best_point(trials)
    assert (chosen["layer"], chosen["num_speculative_tokens"]) == (best.layer, best.num_draft)
    # measured at its own k, a point reports the measured acceptance (vLLM's accepted / proposed)
    stats2 = measure_acceptance(engine, prompts, 1, 2, 12)
    exact = score_point(stats2, draft_cost_ratio(model, 1), 2)
    assert exact["measured_at_k"] == 2 and exact["acceptance"] == stats2.acceptance


def test_ties_go_to_the_cheaper_draft():
    from layerexit.tuning.draft_search import best_point

    rows = [{"layer": 8, "num_speculative_tokens": 2, "cost_ratio": 0.4, "predicted_speedup": 1.1},
            {"layer": 6, "num_speculative_tokens": 2, "cost_ratio": 0.3, "predicted_speedup": 1.1},
            {"layer": 6, "num_speculative_tokens": 1, "cost_ratio": 0.3, "predicted_speedup": 1.1},
            {"layer": 12, "num_speculative_tokens": 1, "cost_ratio": 0.6, "predicted_speedup": 1.0}]
    assert (best_point(rows)["layer"], best_point(rows)["num_speculative_tokens"]) == (6, 1)


# ------------------------------------------------------------------------------------------ Serve export
def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    dst.write_text((REPO / "serve_configs" / name).read_text())
    return dst


def _comments(path: Path) -> list[str]:
    return [l for l in path.read_text().splitlines() if l.lstrip().startswith("#")]


def test_vllm_serve_config_gets_the_draft_comments_kept(tmp_path):
    from layerexit.serving.vllm_config import parse_vllm_args
    from layerexit.tuning.draft_search import rewrite_serve_draft, serve_config_kind

    path = _copy("smollm2_vllm.yaml", tmp_path)
    before = yaml.safe_load(path.read_text())
    comments = _comments(path)
    assert serve_config_kind(path) == "vllm"
    rewrite_serve_draft(path, "~/drafts/smollm2-l12", 12, 2, comment="tuned: test")
    after = yaml.safe_load(path.read_text())
    args = after["applications"][0]["args"]
    assert args["draft"] == "~/drafts/smollm2-l12" and args["num_draft"] == 2
    assert {k: v for k, v in args.items() if k not in ("draft", "num_draft")} == \
        {k: v for k, v in before["applications"][0]["args"].items() if k not in ("draft", "num_draft")}
    assert _comments(path) == comments and "# tuned: test" in path.read_text()
    parse_vllm_args(args)
    with pytest.raises(ConfigError, match="num_draft"):
        rewrite_serve_draft(path, "~/d", 12, 40)
    assert yaml.safe_load(path.read_text()) == after  # a bad value never reaches the file


def test_engine_serve_config_gets_a_self_speculative_user_config(tmp_path):
    from layerexit.engine.options import ExitConfig
    from layerexit.tuning.draft_search import rewrite_serve_draft, serve_config_kind

    path = _copy("smollm2.yaml", tmp_path)
    assert serve_config_kind(path) == "engine"
    rewrite_serve_draft(path, "unused", 24, 3)
    app = next(a for a in yaml.safe_load(path.read_text())["applications"]
               if a["import_path"].startswith("layerexit.serving"))
    uc = next(d for d in app["deployments"] if d["name"] == "EarlyExitLLM")["user_config"]
    assert (uc["policy"], uc["draft"], uc["layer"], uc["num_draft"]) == ("self-speculative", "layer", 24, 3)
    ExitConfig.model_validate({k: v for k, v in uc.items() if k in ExitConfig.model_fields})


def test_a_serve_config_that_is_not_ours_is_refused(tmp_path):
    from layerexit.tuning.draft_search import serve_config_kind

    other = tmp_path / "other.yaml"
    other.write_text("applications:\n  - name: x\n    import_path: somewhere.else:app\n")
    with pytest.raises(ConfigError, match="no application importing layerexit.serving"):
        serve_config_kind(other)
    with pytest.raises(LayerexitError, match="does not exist"):
        serve_config_kind(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------- the job
def test_job_script_doc_help_and_check(capsys, tmp_path):
    job = _job()
    assert job.__doc__.startswith("ray job submit --address http://127.0.0.1:8265 --working-dir . -- python "
                                  "jobs/tune_draft.py --config tune/smollm2_draft.yaml")
    with pytest.raises(SystemExit) as exc:
        job.main(["--help"])
    assert exc.value.code == 0 and "--serve-config" in capsys.readouterr().out
    for path in DRAFT_YAMLS:
        spec = [f"model={tmp_path}"] if path.name == "tiny_draft.yaml" else []
        if spec:
            from layerexit.models.tiny import save_tiny_checkpoint

            save_tiny_checkpoint(tmp_path)
        rc = job.main(["--config", str(path), "--check", "confirm.vllm=false", *spec])
        out = capsys.readouterr()
        assert rc == 0 and "is valid" in out.out, out.err
    rc = job.main(["--config", str(SMOLLM2), "--check", "confirm.vllm=false", "space.layers=[8,31]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "space.layers" in err


def test_missing_vllm_is_a_clear_error_before_anything_starts(capsys, tmp_path, monkeypatch):
    import ray

    from layerexit.tuning.draft_search import run_draft_tuning

    rc = _job().main(["--config", str(SMOLLM2), "--check", f"confirm.python={tmp_path / 'nope' / 'python'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "confirm.python" in err and "make vllm-env" in err
    assert "confirm.vllm: false" in err

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the vLLM check")

    monkeypatch.setattr(ray, "init", no_ray)
    cfg = load_config(DraftTuneConfig, REPO / "tune" / "tiny_draft.yaml",
                      ["confirm.vllm=true", f"confirm.python={tmp_path / 'nope'}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="make vllm-env"):
        run_draft_tuning(cfg)
    fake = tmp_path / "python"  # a Python without vLLM
    fake.symlink_to(Path(__import__("sys").executable))
    cfg = load_config(DraftTuneConfig, REPO / "tune" / "tiny_draft.yaml",
                      ["confirm.vllm=true", f"confirm.python={fake}", f"output_dir={tmp_path}"])
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="cannot import vllm"):
            run_draft_tuning(cfg)


def test_a_draft_dir_that_is_not_a_draft_is_refused_before_any_trial(tmp_path):
    from layerexit.tuning.draft_search import preflight

    taken = tmp_path / "drafts-l2"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cfg = load_config(DraftTuneConfig, REPO / "tune" / "tiny_draft.yaml",
                      [f"export.draft_dir={tmp_path}/drafts-l{{layer}}"])
    with pytest.raises(ConfigError, match="export.draft_dir: .*drafts-l2 exists and is not a draft directory"):
        preflight(cfg, None)


# ------------------------------------------------------------------------------------- LLaMA on a GPU
LLAMA_7B = REPO / "tune" / "llama2_7b_draft.yaml"


def test_llama_draft_config_is_for_a_gpu_and_the_served_draft_model():
    cfg = load_config(DraftTuneConfig, LLAMA_7B)
    assert (cfg.model.device, cfg.model.dtype, cfg.confirm.dtype) == ("cuda", "bfloat16", "bfloat16")
    assert cfg.confirm.vllm and cfg.confirm.python == "auto"
    # The exit-adapter alternative: the model jobs/configs/llama2_7b_draft.yaml registers, which serve_configs/7b.yaml's
    # comment names as the alternative to its EAGLE-3 draft.
    from layerexit.training import load_train_config

    train = load_train_config(REPO / "jobs" / "configs" / "llama2_7b_draft.yaml", check=False)
    assert cfg.model.spec == f"models:/{train.registered_model_name}@{train.mlflow.alias}"
    assert cfg.model.spec in (REPO / "serve_configs" / "7b.yaml").read_text()
    assert cfg.space.check(cfg.model.num_layers).layers[-1] < 32


def test_llama_check_passes_here_without_gpu_weights_or_vllm(tmp_path, monkeypatch, capsys):
    """`--check` on this CPU machine: the MLflow model is not downloaded (its depth is model.num_layers) and auto
    finding no vLLM is a note; the job itself refuses to start without vLLM, naming confirm.python."""
    import layerexit.models.mlflow_source as mlflow_source
    from layerexit.tuning import draft_search

    def no_download(*args, **kwargs):
        raise AssertionError("--check downloaded the model")

    monkeypatch.setattr(mlflow_source, "download_mlflow_model", no_download)
    monkeypatch.chdir(tmp_path)  # no .venv-vllm here
    monkeypatch.delenv("LAYEREXIT_VLLM_PYTHON", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert draft_search.find_vllm_python("auto") is None
    rc = _job().main(["--config", str(LLAMA_7B), "--check"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "(32 layers)" in out.out and "vLLM confirmation on (auto)" in out.out
    assert "note: confirm.python auto: no vLLM here" in out.out and "layerexit-tune" in out.out
    rc = _job().main(["--config", str(LLAMA_7B), "--check", "space.layers=[8,32]"])
    assert rc == 2 and "space.layers" in capsys.readouterr().err  # the layers are still checked (num_layers)

    cfg = load_config(DraftTuneConfig, LLAMA_7B)
    with pytest.raises(ConfigError) as err:
        draft_search.preflight(cfg, None)
    assert err.value.problem.startswith("confirm.python: auto found no vLLM")
    assert "layerexit-tune image" in err.value.fix and "confirm.vllm: false" in err.value.fix


def test_confirm_python_auto_prefers_this_python_then_the_vllm_venv(tmp_path, monkeypatch):
    import sys

    from layerexit.tuning.draft_search import find_vllm_python, vllm_python

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAYEREXIT_VLLM_PYTHON", raising=False)
    real_find_spec = importlib.util.find_spec
    have_vllm = {"here": False}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if have_vllm["here"] else None)
                        if name == "vllm" else real_find_spec(name, *a))
    venv = tmp_path / ".venv-vllm" / "bin" / "python"
    venv.parent.mkdir(parents=True)
    venv.symlink_to(sys.executable)
    assert find_vllm_python("auto") == Path(".venv-vllm/bin/python")
    have_vllm["here"] = True  # the layerexit-vllm image: vLLM and the project in one Python
    assert find_vllm_python("auto") == Path(sys.executable)
    assert find_vllm_python("~/v/bin/python") == Path.home() / "v" / "bin" / "python"  # a path stays a path
    cfg = load_config(DraftTuneConfig, LLAMA_7B)
    assert vllm_python(cfg) == Path(sys.executable)
    with pytest.raises(ConfigError, match="confirm.python"):
        load_config(DraftTuneConfig, LLAMA_7B, ["confirm.python=' '"])


def test_stated_depth_must_match_a_readable_model(tmp_path):
    from layerexit.models.tiny import save_tiny_checkpoint
    from layerexit.tuning.draft_search import model_depth_of

    save_tiny_checkpoint(tmp_path)  # 4 layers
    assert model_depth_of(str(tmp_path)) == 4 == model_depth_of(str(tmp_path), 4)
    with pytest.raises(ConfigError, match=r"num_layers=32 but .* has 4 layers"):
        model_depth_of(str(tmp_path), 32)
    assert model_depth_of("models:/anything@trained", 32) == 32  # never downloaded
    assert model_depth_of("models:/anything@trained") is None


def test_vllm_check_formats_prompts_as_our_engine_does():
    """The vLLM confirmation decodes the prompts our engine measured: through the chat template when the tokenizer has
    one, else raw text (LLaMA-2 and its LITE models have none; vLLM's chat() would refuse them)."""
    from types import SimpleNamespace

    from layerexit.serving.vllm_check import complete

    class FakeLLM:
        def __init__(self, template):
            self.tokenizer, self.calls = SimpleNamespace(chat_template=template), []

        def get_tokenizer(self):
            return self.tokenizer

        def chat(self, conversations, params, use_tqdm=True):
            self.calls.append(("chat", conversations))
            return ["c"] * len(conversations)

        def generate(self, prompts, params, use_tqdm=True):
            self.calls.append(("generate", prompts))
            return ["g"] * len(prompts)

    with_template, without = FakeLLM("{{ messages }}"), FakeLLM(None)
    assert complete(with_template, ["Hi", "Yo"], None) == ["c", "c"]
    assert with_template.calls == [("chat", [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]])]
    assert complete(without, ["Hi"], None) == ["g"] and without.calls == [("generate", ["Hi"])]


def test_auto_python_prefers_the_images_vllm_environment(tmp_path, monkeypatch):
    """The layerexit-tune image names its vLLM venv in LAYEREXIT_VLLM_PYTHON: auto takes it over this Python."""
    from layerexit.tuning import draft_search

    monkeypatch.setenv("LAYEREXIT_VLLM_PYTHON", str(tmp_path / "vllm-venv" / "bin" / "python"))
    assert draft_search.find_vllm_python("auto") == tmp_path / "vllm-venv" / "bin" / "python"
    assert draft_search.find_vllm_python("/opt/x/bin/python") == Path("/opt/x/bin/python")
