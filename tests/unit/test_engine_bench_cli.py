"""`layerexit bench` as a user runs it: --config NAME=JSON, --dtype, --threads, --json rows with the weights loop,
the memory-bandwidth floor, the machine on every row and, for n-gram drafting, transformers' prompt-lookup decoding;
--compile adds transformers' compiled static cache; --assistant-early-exit / --assistant-model its assisted
generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from layerexit.cli import main

MACHINE_KEYS = {"cpu", "isa", "native_bf16", "cpu_capability", "threads", "cpus", "gpu"}


def _bench_rows(capsys) -> dict[str, dict]:
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return {r["name"]: r for r in rows}


def test_bench_json_rows(tiny_dir, prompts_file, capsys):
    from layerexit.data.prompts import format_prompt, read_prompts
    from layerexit.engine.bench import token_agreement
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig, SamplingParams
    from layerexit.models.loading import load_model_and_tokenizer

    code = main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--limit", "2",
                 "--max-new-tokens", "4", "--policies", "final", "--threads", "1", "--dtype", "float32",
                 "--config", 'ngram={"policy": "self-speculative", "draft": "ngram", "num_draft": 3}',
                 "--config", 'cand={"policy": "confidence", "thresholds": {"1": 0.5}, "check_vocab": 8}',
                 "--config", 'l1={"policy": "fixed", "layer": 1}', "--json", "--bandwidth-mib", "64"])
    assert code == 0
    by = _bench_rows(capsys)
    assert {"hf-generate", "final", "ngram", "cand", "l1", "hf-prompt-lookup", "weights loop (eager F.linear)",
            "floor (memory bandwidth)"} <= set(by)
    for r in by.values():
        assert {"name", "tokens_per_s", "speedup", "flops_ratio", "identical", "agreement", "machine",
                "dtype"} <= set(r)
    assert by["ngram"]["identical"] == 1.0  # lossless in fp32
    assert by["hf-generate"]["agreement"] == 1.0  # the engine's `final` gives transformers' tokens
    # Agreement is measured, not assumed: a layer-1 exit on the untrained tiny model disagrees with `final`, and the
    # bench reports exactly the share an independent decode of both configurations gives.
    model, tok = load_model_and_tokenizer(str(tiny_dir))
    ids = [format_prompt(tok, p.prompt) for p in read_prompts(prompts_file, limit=2)]
    engine = EarlyExitEngine(model, {tok.eos_token_id}, tok.pad_token_id)
    sampling = SamplingParams(max_new_tokens=4)
    final = [r.token_ids for r in engine.generate(ids[:1], ExitConfig(), sampling)
             + engine.generate(ids[1:], ExitConfig(), sampling)]
    l1 = [r.token_ids for r in engine.generate(ids[:1], ExitConfig(policy="fixed", layer=1), sampling)
          + engine.generate(ids[1:], ExitConfig(policy="fixed", layer=1), sampling)]
    expected, _ = token_agreement(l1, final)
    assert expected < 1.0
    assert by["l1"]["agreement"] == pytest.approx(expected)
    assert by["l1"]["mean_exit_layer"] == 1.0 and by["l1"]["flops_ratio"] < 1.0


def _tiny_draft(tiny_dir, out, layers: int):
    """What `layerexit export-draft` writes, by hand: the model's first ``layers`` layers, final norm and head as a
    plain checkpoint, with the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = AutoConfig.from_pretrained(tiny_dir)
    config.num_hidden_layers = layers
    draft = AutoModelForCausalLM.from_config(config)
    missing, _ = draft.load_state_dict(full.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k]
    draft.generation_config = full.generation_config
    draft.save_pretrained(out)
    for f in tiny_dir.iterdir():
        if "token" in f.name or f.name.endswith(".txt"):
            shutil.copy(f, out / f.name)
    return out


def test_bench_fair_rows_and_machine(tiny_dir, prompts_file, tmp_path, capsys, monkeypatch):
    """The rows a fair comparison needs: transformers' compiled static cache, its assisted generation (own early
    layers; a draft model) and the bandwidth floor, each with the machine it ran on. The static-cache forward is
    traced whole by dynamo (fullgraph) but run by the eager backend here, to keep this test seconds long;
    test_engine_compile.py's slow test runs it through inductor."""
    from layerexit.engine.bench import HfStaticCompiled

    monkeypatch.setattr(HfStaticCompiled, "COMPILE", {"backend": "eager", "fullgraph": True})
    draft = _tiny_draft(tiny_dir, tmp_path / "draft", layers=2)
    code = main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--limit", "2",
                 "--max-new-tokens", "3", "--policies", "final", "--threads", "1", "--dtype", "float32",
                 "--hf-compiled", "--assistant-early-exit", "2", "--assistant-model", str(draft), "--json",
                 "--bandwidth-mib", "64"])
    assert code == 0
    by = _bench_rows(capsys)
    assert {"hf-generate-static-compiled", "hf-assisted-early-exit", "hf-assisted-draft",
            "floor (memory bandwidth)", "weights loop (eager F.linear)"} <= set(by)
    for r in by.values():
        assert MACHINE_KEYS <= set(r["machine"]) and r["machine"]["threads"] == 1 and r["dtype"] == "float32"
        assert r["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    static = by["hf-generate-static-compiled"]
    assert static["tokens"] > 0 and static["compile_seconds"] > 0
    assert static["agreement"] == 1.0  # the same model, greedy, fp32: transformers' static cache changes no token
    for name in ("hf-assisted-early-exit", "hf-assisted-draft"):  # lossless drafting in transformers too
        assert by[name]["tokens"] > 0 and by[name]["identical"] == 1.0 and by[name]["flops_per_token"] is None
    floor = by["floor (memory bandwidth)"]
    assert floor["bandwidth_gbs"] > 0 and floor["bytes_per_token"] > 0
    assert floor["tokens_per_s"] == pytest.approx(floor["bandwidth_gbs"] * 1e9 / floor["bytes_per_token"])


def test_weight_bytes_per_token_counts_one_embedding_row(tiny_model):
    from layerexit.engine.bench import weight_bytes_per_token

    emb = tiny_model.get_input_embeddings().weight
    assert tiny_model.get_output_embeddings().weight is emb  # tied, like SmolLM2: the head reads the whole matrix
    every = sum(p.numel() for p in tiny_model.parameters())  # tied tensors once
    assert weight_bytes_per_token(tiny_model) == (every + emb.shape[1]) * 4
    assert weight_bytes_per_token(tiny_model.to(torch.bfloat16)) == (every + emb.shape[1]) * 2


def test_bench_bad_config_names_the_problem(tiny_dir, prompts_file, capsys):
    assert main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--config", "nojson"]) == 2
    assert "NAME=JSON" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file),
                 "--config", 'x={"policy": "self-speculative", "draft": "magic"}']) == 2
    assert "draft source" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--dtype", "float16"]) == 2


def test_generate_takes_an_early_exit_object(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "hi there", "--policy", "self-speculative",
            "--max-new-tokens", "5", "--json", "--dtype", "float32"]
    assert main([*args, "--early-exit", '{"draft": "ngram", "num_draft": 4}']) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi there", "--max-new-tokens", "5", "--json",
                 "--dtype", "float32"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert spec["token_ids"] == final["token_ids"]
    assert main([*args, "--early-exit", '{"draft": "sideways"}']) == 2
    assert "draft source" in capsys.readouterr().err
    assert main([*args, "--early-exit", "[1]"]) == 2
