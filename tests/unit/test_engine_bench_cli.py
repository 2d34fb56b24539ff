"""`layerexit bench` as a user runs it: --config NAME=JSON, --dtype, --threads, --json rows with the floor and,
for n-gram drafting, transformers' prompt-lookup decoding."""

from __future__ import annotations

import json

from layerexit.cli import main


def test_bench_json_rows(tiny_dir, prompts_file, capsys):
    code = main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--limit", "2",
                 "--max-new-tokens", "4", "--policies", "final", "--threads", "1", "--dtype", "float32",
                 "--config", 'ngram={"policy": "self-speculative", "draft": "ngram", "num_draft": 3}',
                 "--config", 'cand={"policy": "confidence", "thresholds": {"1": 0.5}, "check_vocab": 8}', "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [r["name"] for r in rows]
    assert {"hf-generate", "final", "ngram", "cand", "hf-prompt-lookup"} <= set(names)
    assert any("floor" in n for n in names)
    for r in rows:
        assert {"name", "tokens_per_s", "speedup", "flops_ratio", "identical", "agreement"} <= set(r)
    by = {r["name"]: r for r in rows}
    assert by["ngram"]["identical"] == 1.0 and by["final"]["agreement"] == 1.0  # lossless in fp32


def test_bench_bad_config_names_the_problem(tiny_dir, prompts_file, capsys):
    assert main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--config", "nojson"]) == 2
    assert "NAME=JSON" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file),
                 "--config", 'x={"policy": "self-speculative", "draft": "magic"}']) == 2
    assert "draft source" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--dtype", "float16"]) == 2


def test_generate_takes_an_early_exit_object(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "hi there", "--policy", "self-speculative",
            "--max-new-tokens", "5", "--json"]
    assert main([*args, "--early-exit", '{"draft": "ngram", "num_draft": 4}']) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi there", "--max-new-tokens", "5", "--json"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert spec["token_ids"] == final["token_ids"]
    assert main([*args, "--early-exit", '{"draft": "sideways"}']) == 2
    assert "draft source" in capsys.readouterr().err
    assert main([*args, "--early-exit", "[1]"]) == 2
