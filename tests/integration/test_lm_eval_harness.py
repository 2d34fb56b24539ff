"""lm-evaluation-harness against the server, end to end: Serve on the tiny model (saved WITHOUT a chat template,
like a LLaMA-2 base tokenizer), the real ``lm_eval`` CLI with model ``local-completions`` over HTTP, two tasks
defined in YAML over local JSONL files: one log-likelihood task (multiple_choice: echo + logprobs, max_tokens 1)
and one generation task (generate_until). The scores must be numbers.

The same server answers chat requests with the Alpaca template the LITE configs train with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from layerexit.localhost import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "tiny-alpaca"

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""

MC_ROWS = [
    {"question": "What colour is the sky?", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "How many legs has a cat?", "choices": [" two", " four", " nine"], "answer": 1},
    {"question": "Which is a fruit?", "choices": [" stone", " chair", " apple"], "answer": 2},
]
GEN_ROWS = [{"question": "Say hello.", "answer": "hello"}, {"question": "Count to two.", "answer": "one two"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="pip install -e '.[dev]' installs lm_eval")
    ray = pytest.importorskip("ray")
    from ray import serve

    from layerexit.models.tiny import save_tiny_checkpoint
    from layerexit.serving.app import build_app

    tmp = tmp_path_factory.mktemp("lmeval")
    model_dir = save_tiny_checkpoint(tmp / "tiny-model", num_layers=4)
    # a base-model tokenizer: no chat template anywhere (tokenizer_config.json or chat_template.jinja)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": str(model_dir), "model_name": MODEL, "torch_threads": 1, "max_prompt_tokens": 256,
                         "max_tokens_limit": 64, "default_max_tokens": 8, "user_config": {"policy": "final"},
                         "deployment_options": {"ray_actor_options": {"num_cpus": 1}}})
        serve.run(app, name="lmeval", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 180
        while time.monotonic() < end:
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base, model_dir, tmp
    finally:
        serve.shutdown()
        ray.shutdown()


def test_chat_works_without_a_chat_template(server) -> None:
    from transformers import AutoTokenizer

    from layerexit.data.datasets import alpaca_prompt

    base, model_dir, _ = server
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert not getattr(tok, "chat_template", None)
    resp = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 4,
        "temperature": 0})
    assert resp.status_code == 200, resp.text
    expected = tok(alpaca_prompt({"instruction": "Name three colours."}), add_special_tokens=True)["input_ids"]
    assert resp.json()["usage"]["prompt_tokens"] == len(expected)


def test_lm_eval_local_completions_scores_both_tasks(server) -> None:
    base, model_dir, tmp = server
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, rows, template in (("mc", MC_ROWS, MC_TASK), ("gen", GEN_ROWS, GEN_TASK)):
        data = tmp / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"tiny_{name}.yaml").write_text(template.format(data=data))
    out = tmp / "results"
    cli = Path(sys.executable).with_name("lm_eval")
    cmd = [str(cli), "--model", "local-completions", "--model_args",
           f"model={MODEL},base_url={base}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
           "tokenized_requests=True,num_concurrent=2,max_retries=1,max_length=256",
           "--tasks", "tiny_mc,tiny_gen", "--include_path", str(tasks), "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results_files = sorted(out.rglob("results*.json"))
    assert results_files, proc.stdout[-2000:]
    results = json.loads(results_files[-1].read_text())["results"]
    mc, gen = results["tiny_mc"], results["tiny_gen"]
    for value in (mc["acc,none"], mc["acc_norm,none"], gen["exact_match,none"]):
        assert isinstance(value, (int, float)) and 0.0 <= value <= 1.0
