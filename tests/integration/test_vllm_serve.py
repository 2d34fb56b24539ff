"""The vLLM backend for real: SmolLM2 on CPU through vLLM (``.venv-vllm``) under Ray Serve LLM, with an early-exit
draft made by ``layerexit export-draft``, deployed with ``.venv-vllm/bin/serve run`` from
serve_configs/smollm2_vllm.yaml (the same file, with the test's draft, ports and a short max_model_len) on a
``ray start --head`` of .venv-vllm, and queried with the official ``openai`` client from this (main) venv.

- chat (streaming and not) and completions answer, through vLLM's own OpenAI serving code;
- vLLM's speculative-decoding counters reach Ray's Prometheus export and show accepted draft tokens;
- greedy tokens with the draft equal those without it in fp32 (vLLM's offline ``LLM`` in .venv-vllm,
  ``python -m layerexit.serving.vllm_check``).

One Ray cluster (its own ports and temp dir) for the module, stopped at the end by its process group. vLLM runs
eager (``enforce_eager``) so it starts in about a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from layerexit.serving.vllm_cluster import REPO, VLLM_BIN, VLLM_VENV, VllmCluster, run_group, vllm_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.model]

CONFIG = REPO / "serve_configs" / "smollm2_vllm.yaml"
MODEL = "smollm2"
DRAFT_LAYER = 24
START_DEADLINE_S = 360

if not (VLLM_BIN / "serve").exists():
    pytest.skip(f"no {VLLM_VENV}: run `make vllm-env` (`make test` builds it)", allow_module_level=True)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, smollm2_path) -> Path:
    """SmolLM2's first 24 layers + final norm + head, exported by the real CLI (main venv)."""
    out = tmp_path_factory.mktemp("draft") / f"smollm2-l{DRAFT_LAYER}"
    cli = Path(sys.executable).with_name("layerexit")
    proc = subprocess.run([str(cli), "export-draft", "smollm2", "--layer", str(DRAFT_LAYER), "--out", str(out),
                           "--measure", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["layer"] == DRAFT_LAYER and info["num_layers"] == DRAFT_LAYER
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, draft_dir):
    config = yaml.safe_load(CONFIG.read_text())
    c = VllmCluster(tmp_path_factory.mktemp("vllm-serve"))
    try:
        config["http_options"].update(request_timeout_s=300)  # 2 shared cores: slow steps
        config["applications"][0]["args"].update(model=MODEL, draft=str(draft_dir), max_model_len=512)
        c.serve_and_wait(config, timeout=START_DEADLINE_S)
        print(f"vLLM app up after {c.start_s:.0f} s")
        yield c
    except (RuntimeError, TimeoutError) as err:
        raise AssertionError(f"{err}\n{c.logs()}") from None
    finally:
        c.stop()


# Runs first, before the cluster exists: the two share 2 cores.
def test_greedy_tokens_with_the_draft_equal_those_without_it_fp32(draft_dir, tmp_path) -> None:
    out = tmp_path / "check.json"
    cmd = [str(VLLM_BIN / "python"), "-m", "layerexit.serving.vllm_check", "--model", "smollm2", "--draft",
           str(draft_dir), "--num-draft", "3", "--dtype", "float32", "--compare", "--batch", "--limit", "3",
           "--max-tokens", "16", "--max-model-len", "512", "--json", str(out)]
    code, output = run_group(cmd, timeout=780, env=vllm_env(), cwd=tmp_path)
    assert code == 0, output[-5000:]
    report = json.loads(out.read_text())
    assert report["prompts"] == 3 and report["identical"] == 3, report
    spec = report["with_draft"]["spec_decode"]
    assert spec["accepted_tokens"] > 0 and spec["draft_tokens"] > 0
    assert all(len(t) > 0 for t in report["without_draft"]["token_ids"])
    print(f"fp32 identity: 3/3 identical; spec decode {spec}")


def test_models_lists_the_served_name(cluster) -> None:
    models = cluster.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completions_non_streaming_and_streaming(cluster) -> None:
    client = cluster.client()
    messages = [{"role": "user", "content": "Name three colours."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("length", "stop")

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert streamed == text  # greedy: the same answer either way


def test_completions(cluster) -> None:
    reply = cluster.client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                                temperature=0)
    assert reply.choices[0].text.strip() and reply.usage.completion_tokens > 0


def test_speculative_counters_reach_ray_prometheus_export(cluster) -> None:
    client = cluster.client()
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 10."}],
                                   max_tokens=8, temperature=0)

    def accepted():
        counters = cluster.spec_counters()
        return counters if counters.get("accepted_tokens", 0) > 0 else None

    counters = wait_until(accepted, 60, "ray_vllm_spec_decode_num_accepted_tokens_total > 0", interval=2)
    assert counters["draft_tokens"] >= counters["accepted_tokens"] > 0
    assert counters["drafts"] > 0
    print(f"spec decode over the serve test: {counters} (acceptance "
          f"{counters['accepted_tokens'] / counters['draft_tokens']:.2f})")
