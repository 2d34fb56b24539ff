"""The EAGLE-3 draft a model carries, exported for vLLM and checked before vLLM starts (main .venv, tiny models).

- ``export_eagle3`` writes vLLM's checkpoint in the dtype asked (integer maps untouched), the tokenizer and
  ``layerexit_draft.json`` (kind, shipped draft length, target shape), and refuses a model without a draft or an
  ``--out`` that is not a draft directory;
- the vLLM backend detects it (``draft_method: auto``), runs it with ``method: eagle3`` and the shipped draft length
  (``draft: shipped`` or the export's directory; an explicit ``num_draft`` wins), and refuses, naming the
  field, a draft trained for another model (depth, width, tokenizer), aux layers the model lacks, a draft vocabulary
  larger than the model's, and a ``draft_method`` that contradicts the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from layerexit.errors import ConfigError
from layerexit.models.draft_settings import write_draft_settings
from layerexit.models.eagle3 import Eagle3Draft, Eagle3Spec, save_eagle3
from layerexit.models.eagle3_export import EAGLE3_DIR, export_eagle3, is_eagle3_checkpoint
from layerexit.serving import vllm_backend
from layerexit.serving.vllm_config import parse_vllm_args, resolve_sources


def carrying_model(directory: Path, source: Path, num_draft: int | None = 4, aux=(1, 2, 3)) -> Path:
    """A copy of ``source`` (a tiny HF dir) that carries a random EAGLE-3 draft in bf16 + its draft settings."""
    from transformers import AutoConfig

    shutil.copytree(source, directory)
    cfg = AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    draft = Eagle3Draft(Eagle3Spec.for_target(cfg, aux_layers=aux, draft_vocab_size=cfg.vocab_size // 2))
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.2)
    draft.set_vocab(torch.randperm(cfg.vocab_size)[: cfg.vocab_size // 2])
    save_eagle3(draft, directory / EAGLE3_DIR, dtype=torch.bfloat16)
    settings = {"draft": "eagle3"} | ({"num_draft": num_draft} if num_draft else {})
    write_draft_settings(directory, settings)
    return directory


@pytest.fixture()
def model_dir(tmp_path, tiny_dir) -> Path:
    return carrying_model(tmp_path / "model", tiny_dir)


def args_for(model: Path, draft: str | Path | None, **extra) -> dict:
    return {"model": str(model), "draft": None if draft is None else str(draft), "device": "cpu", **extra}


# ------------------------------------------------------------------------------------------------- export


def test_export_writes_vllm_checkpoint_in_the_dtype_asked(model_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "export"
    info = export_eagle3(model_dir, out, dtype="float32", base_spec="models:/m@trained")
    config = json.loads((out / "config.json").read_text())
    assert is_eagle3_checkpoint(out) and config["dtype"] == "float32"
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    source = load_file(str(model_dir / EAGLE3_DIR / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(source)
    for name, tensor in written.items():
        if name in ("d2t", "t2d"):
            assert tensor.dtype == source[name].dtype and torch.equal(tensor, source[name])
        else:
            assert tensor.dtype == torch.float32 and torch.equal(tensor, source[name].float()), name
    meta = json.loads((out / "layerexit_draft.json").read_text())
    assert meta["kind"] == "eagle3" and meta["num_draft"] == 4 and meta["aux_layers"] == [1, 2, 3]
    assert meta["target"] == {"hidden_size": 64, "num_hidden_layers": 4, "vocab_size": config["vocab_size"]}
    assert meta["base_model"] == "models:/m@trained" and info.num_draft == 4
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()

    again = export_eagle3(model_dir, out)  # an earlier export is replaced; default dtype: as saved
    assert again.dtype == "bfloat16" and load_file(str(out / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16


def test_export_refuses_what_it_cannot_export(model_dir, tiny_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match="carries no EAGLE-3 draft"):
        export_eagle3(tiny_dir, tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--out .* is not a draft directory"):
        export_eagle3(model_dir, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="--dtype"):
        export_eagle3(model_dir, tmp_path / "y", dtype="int8")
    shutil.rmtree(model_dir / EAGLE3_DIR)  # draft settings say eagle3, the draft is gone
    with pytest.raises(ConfigError, match="model: .*draft_settings.json names an EAGLE-3 draft"):
        export_eagle3(model_dir, tmp_path / "z")


# ------------------------------------------------------------------------------------------------ serving


def test_shipped_draft_runs_as_eagle3_with_the_shipped_draft_length(model_dir) -> None:
    cfg = parse_vllm_args(args_for(model_dir, "shipped"))
    sources = resolve_sources(cfg)
    assert sources.method == "eagle3" and sources.num_draft == 4
    assert sources.draft == str((model_dir / EAGLE3_DIR).resolve())
    assert vllm_backend.speculative_config(cfg, sources) == {
        "method": "eagle3", "model": sources.draft, "num_speculative_tokens": 4}
    mine = parse_vllm_args(args_for(model_dir, "shipped", num_draft=2))
    assert vllm_backend.speculative_config(mine, resolve_sources(mine))["num_speculative_tokens"] == 2


def test_exported_draft_is_detected_and_keeps_its_draft_length(model_dir, tiny_dir, tmp_path) -> None:
    out = tmp_path / "export"
    export_eagle3(model_dir, out, dtype="float32")
    for model in (model_dir, tiny_dir):  # the export carries num_draft: any model of the same shape gets it
        cfg = parse_vllm_args(args_for(model, out))
        sources = resolve_sources(cfg)
        assert (sources.method, sources.num_draft) == ("eagle3", 4)
        kwargs = vllm_backend.engine_kwargs(cfg, sources)
        assert kwargs["speculative_config"] == {"method": "eagle3", "model": str(out.resolve()),
                                                "num_speculative_tokens": 4}
    explicit = parse_vllm_args(args_for(tiny_dir, out, draft_method="eagle3"))
    assert resolve_sources(explicit).method == "eagle3"


def test_a_draft_trained_for_another_model_is_refused_naming_the_field(model_dir, tmp_path) -> None:
    from layerexit.models.tiny import save_tiny_checkpoint

    out = tmp_path / "export"
    export_eagle3(model_dir, out)
    deeper = save_tiny_checkpoint(tmp_path / "deeper", num_layers=6)
    with pytest.raises(ConfigError, match=r"draft: the EAGLE-3 draft .* trained for another model "
                                          r"\(num_hidden_layers 4 vs the model's 6\)"):
        resolve_sources(parse_vllm_args(args_for(deeper, out)))
    wider = save_tiny_checkpoint(tmp_path / "wider", num_layers=4, hidden_size=96)
    with pytest.raises(ConfigError, match=r"draft: .*trained for another model \(hidden_size 64 vs the model's 96\)"):
        resolve_sources(parse_vllm_args(args_for(wider, model_dir / EAGLE3_DIR)))
    shutil.copytree(model_dir / EAGLE3_DIR, wider / EAGLE3_DIR)  # shipped by a model it was not trained for
    with pytest.raises(ConfigError, match="draft: .*trained for another model"):
        resolve_sources(parse_vllm_args(args_for(wider, "shipped")))
    # same shape, another tokenizer
    other = tmp_path / "other-tokenizer"
    shutil.copytree(model_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    first = next(iter(tok["model"]["vocab"]))
    tok["model"]["vocab"][first + "x"] = tok["model"]["vocab"].pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="draft: the EAGLE-3 draft's tokenizer .* differs"):
        resolve_sources(parse_vllm_args(args_for(other, out)))


def test_foreign_eagle3_checkpoints_are_checked_by_vllms_own_keys(model_dir, tmp_path) -> None:
    """An EAGLE-3 checkpoint without layerexit metadata: target width, aux layers and draft vocabulary."""
    foreign = tmp_path / "foreign"
    shutil.copytree(model_dir / EAGLE3_DIR, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config.pop("layerexit")
    (foreign / "config.json").write_text(json.dumps(config))
    assert resolve_sources(parse_vllm_args(args_for(model_dir, foreign))).method == "eagle3"
    for key, value, message in [
        ("eagle_config", {"eagle_aux_hidden_state_layer_ids": [1, 9]}, r"aux layers \[9\], out of range"),
        ("target_hidden_size", 4096, r"hidden_size 4096 vs the model's 64"),
        ("draft_vocab_size", 10**6, "draft_vocab_size 1000000, larger than the model's vocabulary"),
    ]:
        (foreign / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match="draft: .*" + message):
            resolve_sources(parse_vllm_args(args_for(model_dir, foreign)))


def test_draft_method_and_shipped_mistakes_name_the_field(model_dir, tiny_dir, tmp_path) -> None:
    layer_draft = tmp_path / "layer-draft"
    shutil.copytree(tiny_dir, layer_draft)
    cfg = json.loads((layer_draft / "config.json").read_text())
    (layer_draft / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    assert resolve_sources(parse_vllm_args(args_for(tiny_dir, layer_draft))).method == "draft_model"
    with pytest.raises(ConfigError, match="draft_method: eagle3, but .* is not an EAGLE-3 checkpoint"):
        resolve_sources(parse_vllm_args(args_for(tiny_dir, layer_draft, draft_method="eagle3")))
    with pytest.raises(ConfigError, match="draft_method: draft_model, but .* is an EAGLE-3 checkpoint"):
        resolve_sources(parse_vllm_args(args_for(model_dir, "shipped", draft_method="draft_model")))
    with pytest.raises(ConfigError, match="draft_method"):
        parse_vllm_args(args_for(model_dir, "ngram", draft_method="eagle3"))
    with pytest.raises(ConfigError, match="draft: shipped: .* carries no EAGLE-3 draft"):
        resolve_sources(parse_vllm_args(args_for(tiny_dir, "shipped")))
    layer_model = tmp_path / "layer-model"
    shutil.copytree(tiny_dir, layer_model)
    write_draft_settings(layer_model, {"layer": 2, "num_draft": 3})
    with pytest.raises(ConfigError, match="draft: shipped: .* ships a layer-2 draft") as err:
        resolve_sources(parse_vllm_args(args_for(layer_model, "shipped")))
    assert "layerexit export-draft" in str(err.value.fix)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_exports_the_eagle3_draft_a_model_carries_and_keeps_layer_drafts(model_dir, tmp_path, capsys) -> None:
    from layerexit.cli import main

    out = tmp_path / "export"
    assert main(["export-draft", str(model_dir), "--out", str(out), "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out.strip().splitlines()[-1])
    assert info["kind"] == "eagle3" and info["dtype"] == "float32" and info["directory"] == str(out)
    assert "carries an EAGLE-3 draft" in captured.err and is_eagle3_checkpoint(out)
    # --layer still exports a layer draft (a plain checkpoint) of the same model
    layer_out = tmp_path / "layer"
    assert main(["export-draft", str(model_dir), "--layer", "2", "--out", str(layer_out), "--measure", "0"]) == 0
    assert json.loads((layer_out / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((layer_out / "layerexit_draft.json").read_text())["layer"] == 2


def test_cli_registers_the_export_beside_the_registered_model_and_serving_resolves_it(model_dir, tmp_path,
                                                                                       monkeypatch) -> None:
    import mlflow

    from layerexit.cli import main
    from layerexit.tracking import log_hf_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LAYEREXIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # artifacts under ./mlruns
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("layerexit-train")
    with mlflow.start_run():
        log_hf_model(model_dir, registered_name="tiny-e3", alias="trained")
    assert main(["export-draft", "models:/tiny-e3@trained", "--out", str(tmp_path / "export")]) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias("tiny-e3-draft", "trained")
    assert version.tags["layerexit.draft.kind"] == "eagle3" and version.tags["layerexit.draft.num_draft"] == "4"
    cfg = parse_vllm_args({"model": "models:/tiny-e3@trained", "draft": "models:/tiny-e3-draft@trained",
                           "device": "cpu", "mlflow_tracking_uri": uri})
    sources = resolve_sources(cfg)
    assert (sources.method, sources.num_draft) == ("eagle3", 4) and is_eagle3_checkpoint(sources.draft)
    shipped = resolve_sources(parse_vllm_args({"model": "models:/tiny-e3@trained", "draft": "shipped",
                                               "device": "cpu", "mlflow_tracking_uri": uri}))
    assert shipped.method == "eagle3" and Path(shipped.draft).name == EAGLE3_DIR


# -------------------------------------------------------------------------------------------------- bench


def test_bench_eagle3_row_serves_a_carrying_model_or_an_export(model_dir, tiny_dir, tmp_path) -> None:
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import vllm_serve_bench as bench

    args = argparse.Namespace(eagle3=str(model_dir), model=str(tiny_dir), eagle3_k=None)
    model, draft, k, info = bench._eagle3_source(args)
    assert (model, draft, k) == (str(model_dir), "shipped", 4)
    assert info["eagle3"]["draft_vocab_size"] == info["eagle3"]["vocab_size"] // 2
    out = tmp_path / "export"
    export_eagle3(model_dir, out)
    args = argparse.Namespace(eagle3=str(out), model=str(tiny_dir), eagle3_k=2)
    assert bench._eagle3_source(args)[:3] == (str(tiny_dir), str(out), 2)
    with pytest.raises(SystemExit, match="neither carries an EAGLE-3 draft nor is one"):
        bench._eagle3_source(argparse.Namespace(eagle3=str(tiny_dir), model=str(tiny_dir), eagle3_k=None))
    # LLaMA-2-7B: one EAGLE-3 layer + fc + head is ~6-7% of a step's weight bytes, less with a pruned head
    full, half = bench.eagle3_llama_cost_ratio(1.0), bench.eagle3_llama_cost_ratio(0.5)
    assert 0.05 < half < full < 0.08
