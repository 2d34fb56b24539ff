"""`layerexit alignment` on the tiny model, and the CLI's bad-input contract (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerexit.cli import main


def test_alignment_json_has_one_row_per_layer_final_at_100(tiny_dir, prompts_file, capsys):
    rc = main(["alignment", "--model", str(tiny_dir), "--prompts", str(prompts_file),
               "--max-new-tokens", "6", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in report["rows"]] == [1, 2, 3, 4]
    assert report["rows"][-1]["alignment"] == 1.0
    assert report["num_prompts"] == 3
    assert 0 < report["num_tokens"] <= 18
    for row in report["rows"]:
        assert 0.0 <= row["alignment"] <= 1.0
        assert sum(row["bin_counts"]) == row["tokens"] == report["num_tokens"]


def test_alignment_table_and_plot(tiny_dir, prompts_file, tmp_path, capsys):
    png = tmp_path / "fig.png"
    rc = main(["alignment", "--model", str(tiny_dir), "--prompts", str(prompts_file),
               "--max-new-tokens", "4", "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "aligned %" in out and "100.0" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alignment_matches_fixed_exit_argmax(tiny_model_and_tokenizer):
    """The alignment numbers equal a direct count from early_exit_logits on the same sequence."""
    import torch

    from layerexit.evaluation.alignment import alignment_from_generations
    from layerexit.models.exits import early_exit_logits

    model, _ = tiny_model_and_tokenizer
    prompt, response = [5, 9, 17, 33], [40, 41, 42, 43, 44]
    report = alignment_from_generations(model, [prompt], [response], show_progress=False)
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        final = early_exit_logits(model, ids, 4)[0, 3:8].argmax(-1)
        for layer in (1, 2, 3):
            top = early_exit_logits(model, ids, layer)[0, 3:8].argmax(-1)
            assert report.row(layer).alignment == pytest.approx(float((top == final).float().mean()))


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no prompts"),
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', ":2: malformed JSON"),
        ('{"text": "no prompt field"}\n', ":1: no non-empty string field 'prompt'"),
    ],
)
def test_bad_prompt_files(tiny_dir, tmp_path, capsys, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    assert main(["alignment", "--model", str(tiny_dir), "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_model_specs(prompts_file, tmp_path, capsys):
    assert main(["alignment", "--model", "not a model", "--prompts", str(prompts_file)]) == 2
    assert "unknown model spec" in capsys.readouterr().err
    assert main(["alignment", "--model", str(tmp_path), "--prompts", str(prompts_file)]) == 2
    assert "without config.json" in capsys.readouterr().err
    assert main(["alignment", "--model", str(tmp_path / "x.gguf"), "--prompts", str(prompts_file)]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "layerexit.cli", "alignment", "--model", "smollm2", "--prompts",
         str(tmp_path / "missing.jsonl")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "prompt file not found" in proc.stderr


def test_every_command_has_help():
    for cmd in ([], ["fetch-model"], ["alignment"], ["generate"], ["bench"], ["train-classifier"], ["eval"],
                ["tune"], ["train"], ["heldout-prompts"], ["k8s", "render"]):
        proc = subprocess.run([sys.executable, "-m", "layerexit.cli", *cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "Usage" in proc.stdout


def test_subcommand_exit_codes_reach_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "layerexit.cli", "tune", "--config", str(tmp_path / "no.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_prompt_splits_are_disjoint_and_limited(tmp_path, capsys):
    assert main(["heldout-prompts", str(tmp_path / "heldout.jsonl")]) == 0
    assert main(["heldout-prompts", "--split", "train", "--limit", "16", str(tmp_path / "train.jsonl")]) == 0
    heldout = [json.loads(x) for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(train) == 16 and len(heldout) >= 60
    assert not {p["id"] for p in train} & {p["id"] for p in heldout}
    assert len({p["category"] for p in train}) >= 8  # categories interleaved, not the first category 16 times
    assert main(["heldout-prompts", "--split", "test", str(tmp_path / "x.jsonl")]) == 2
    assert "use heldout or train" in capsys.readouterr().err
