"""``--check`` on every job script that takes a config (issue 15).

``--check`` loads the YAML with its ``key=value`` overrides, validates it (fields, ranges, model depth from a local
config.json or ``model.num_layers``, data paths, search spaces) and exits 0, starting nothing: no Ray, no model
weights, no MLflow. A bad key or value exits 2 with the field named on stderr. Every shipped config is checked with
the script that runs it (the RayJob entrypoints are run the same way in test_k8s_manifests.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def job(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN_CONFIGS = sorted(p for p in (REPO / "jobs" / "configs").glob("*.yaml") if not p.name.startswith("eval_"))
EVAL_CONFIGS = sorted((REPO / "jobs" / "configs").glob("eval_*.yaml"))
# draft searches (their launch line runs jobs/tune_draft.py) are checked with that script
TUNE_CONFIGS = sorted(p for p in (REPO / "tune").glob("*.yaml") if p.name != "tiny_draft.yaml")  # tests' model
CASES = ([("train_lite", p) for p in TRAIN_CONFIGS] + [("evaluate", p) for p in EVAL_CONFIGS]
         + [("tune_draft" if "jobs/tune_draft.py" in p.read_text().splitlines()[0] else "tune_thresholds", p)
            for p in TUNE_CONFIGS])


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_every_config_is_covered() -> None:
    assert TRAIN_CONFIGS and EVAL_CONFIGS and TUNE_CONFIGS


@pytest.mark.parametrize(("script", "config"), CASES, ids=[f"{s}:{p.name}" for s, p in CASES])
def test_check_accepts_every_shipped_config(script: str, config: Path, capsys) -> None:
    rc = job(script).main(["--config", str(config), "--check"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "is valid" in out.out


@pytest.mark.parametrize(
    ("script", "config", "override", "field"),
    [
        ("train_lite", "jobs/configs/llama2_7b_lite.yaml", "storage_path=/mnt/x", "storage_path"),
        ("train_lite", "jobs/configs/llama2_7b_lite.yaml", "deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("train_lite", "jobs/configs/smollm2_lite.yaml", "lite.exit_layers=[8,40]", "lite.exit_layers"),
        ("evaluate", "jobs/configs/eval_smollm2.yaml", "max_new_tokens=-1", "max_new_tokens"),
        ("tune_thresholds", "tune/smollm2.yaml", "search.num_trials=0", "search.num_trials"),
        ("tune_thresholds", "tune/smollm2.yaml", "space.exit_layers=[]", "exit_layers"),
    ],
)
def test_check_rejects_bad_input_naming_the_field(script: str, config: str, override: str, field: str,
                                                  capsys) -> None:
    rc = job(script).main(["--config", str(REPO / config), override, "--check"])
    err = capsys.readouterr().err
    assert rc == 2
    assert field in err, err


def test_check_starts_nothing(tmp_path: Path) -> None:
    """In a fresh interpreter: --check imports neither Ray nor DeepSpeed and loads no weights."""
    import subprocess

    code = (
        "import sys, runpy; sys.argv = ['train_lite.py', '--config', 'jobs/configs/llama2_7b_lite.yaml', "
        "'checkpoint.storage_path=/mnt/shared/ray-results', '--check']\n"
        "try:\n    runpy.run_path('jobs/train_lite.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = [m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\nprint('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "clean" in result.stdout


def test_an_mlflow_base_model_with_num_layers_checks_offline(tmp_path: Path, monkeypatch, capsys) -> None:
    """jobs/configs/llama2_7b_draft.yaml trains on models:/layerexit-llama2_7b_lite@trained: --check takes its depth
    from model.num_layers and never contacts MLflow (the registry would hand over the whole 7B model)."""
    import layerexit.models.mlflow_source as mlflow_source

    def no_download(*args, **kwargs):
        raise AssertionError("--check downloaded the MLflow model")

    monkeypatch.setattr(mlflow_source, "download_mlflow_model", no_download)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    config = REPO / "jobs" / "configs" / "llama2_7b_draft.yaml"
    assert job("train_lite").main(["--config", str(config), "--check"]) == 0, capsys.readouterr().err
    rc = job("train_lite").main(["--config", str(config), "lite.exit_layers=[4,32]", "--check"])
    assert rc == 2 and "lite.exit_layers" in capsys.readouterr().err  # still checked against num_layers


def test_an_mlflow_base_model_without_num_layers_names_the_fix(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # an empty registry
    config = REPO / "jobs" / "configs" / "llama2_7b_draft.yaml"
    rc = job("train_lite").main(["--config", str(config), "num_layers=null", "--check"])
    err = capsys.readouterr().err
    assert rc == 2 and "model: " in err and "layerexit-llama2_7b_lite" in err and "num_layers" in err


def test_the_job_checks_an_mlflow_base_models_real_depth(tmp_path: Path, monkeypatch) -> None:
    """At run time the registered model is fetched anyway: a model.num_layers that is not its depth stops the job."""
    import layerexit.models.loading as loading
    from layerexit.errors import ConfigError
    from layerexit.models.tiny import save_tiny_checkpoint
    from layerexit.training import load_train_config
    from layerexit.training.config import check_registered_depth

    tiny = save_tiny_checkpoint(tmp_path / "tiny")  # 4 layers
    fetched = []

    def fake_resolve(spec: str, fetch: bool = True):
        fetched.append(spec)
        return loading.ResolvedModel(spec, "mlflow", str(tiny))

    monkeypatch.setattr(loading, "resolve_model", fake_resolve)
    cfg = load_train_config(REPO / "jobs" / "configs" / "llama2_7b_draft.yaml", ["lite.exit_layers=[1,2]",
                                                                                 "num_layers=4"])
    assert not fetched  # validation took num_layers
    assert check_registered_depth(cfg, 4) == 4 and fetched == ["models:/layerexit-llama2_7b_lite@trained"]
    with pytest.raises(ConfigError, match="num_layers=32 but models:/layerexit-llama2_7b_lite@trained has 4"):
        check_registered_depth(cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_layers": 32})}), 32)
