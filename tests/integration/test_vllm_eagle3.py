"""vLLM runs our EAGLE-3 draft natively, and it is lossless where users see it (SmolLM2, CPU, fp32, greedy).

A draft that really accepts without a long training: ``benchmarks/eagle3_quick_draft.py`` fits one (training-time
test, ~1 min) to the model's own greedy answers to three prompts and writes the layout the eagle3 recipe registers
(base model + ``eagle3/`` in vLLM's ``LlamaForCausalLMEagle3`` layout + ``draft_settings.json``; the CLI export of
that directory is tested in tests/unit/test_eagle3_export.py). Then, through Ray Serve over HTTP (``serve run`` of serve_configs/smollm2_vllm.yaml's application, twice in one Serve
  config: ``draft: shipped`` at ``/`` and ``draft: none`` at ``/nodraft``, one cluster, both engines started together)
  the chat answers are identical, and Ray's metrics export shows the drafted engine accepting.

The draft is fitted to the answers it is asked for again: its acceptance here checks the format and the serving
path, it measures nothing about a trained draft. Two vLLM engine start-ups (eager, ~1 min each).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from layerexit.serving.vllm_cluster import REPO, VLLM_BIN, VLLM_VENV, VllmCluster, wait_until

# The module's fixtures (draft fitting, each test's vLLM start-ups) count against the first test that uses them: on
# 2 shared cores one test has taken 13 min.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.model, pytest.mark.timeout(1800)]

CONFIG = REPO / "serve_configs" / "smollm2_vllm.yaml"
PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.",
           "Write a haiku about autumn leaves."]
MAX_TOKENS = 32
NUM_DRAFT = 3
START_DEADLINE_S = 600

if not (VLLM_BIN / "serve").exists():
    pytest.skip(f"no {VLLM_VENV}: run `make vllm-env` (`make test` builds it)", allow_module_level=True)


@pytest.fixture(scope="module")
def prompts_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def carrying_model(tmp_path_factory, smollm2_path, prompts_path) -> Path:
    """SmolLM2 + a quickly fitted EAGLE-3 draft, in the layout a trained eagle3 model is registered with."""
    out = tmp_path_factory.mktemp("quick-eagle3") / "model"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eagle3_quick_draft.py"), "--out", str(out),
                           "--prompts", str(prompts_path), "--max-new-tokens", str(MAX_TOKENS), "--num-draft",
                           str(NUM_DRAFT), "--seconds", "60", "--max-steps", "300"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"quick draft: {report}")
    assert report["train_accuracy_per_step"][0] > 0.2, report  # it learnt something to accept
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, carrying_model):
    """One Serve config, two applications of smollm2_vllm.yaml's: with the shipped EAGLE-3 draft and without."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"].update(request_timeout_s=600)  # 2 shared cores: slow steps
    drafted = config["applications"][0]
    drafted["args"].update(model=str(carrying_model), model_name="smollm2", draft="shipped", max_model_len=512)
    drafted["args"].pop("num_draft", None)  # the shipped k
    plain = yaml.safe_load(yaml.safe_dump(drafted))
    plain.update(name=drafted["name"] + "-nodraft", route_prefix="/nodraft")
    plain["args"].update(draft="none", model_name="smollm2-nodraft")
    config["applications"] = [drafted, plain]
    # each application: {"CPU": 1} for its engine + 1 for its router; both engines share the 2 real cores
    c = VllmCluster(tmp_path_factory.mktemp("vllm-eagle3-serve"), num_cpus=4)
    try:
        c.serve_and_wait(config, timeout=START_DEADLINE_S)
        wait_until(lambda: httpx.get(c.base + "/nodraft/v1/models", timeout=10).status_code == 200, START_DEADLINE_S,
                   "the no-draft app to serve /nodraft/v1/models", interval=2, alive=c.alive)
        print(f"both vLLM apps up after {c.start_s:.0f} s")
        yield c
    except (RuntimeError, TimeoutError) as err:
        raise AssertionError(f"{err}\n{c.logs()}") from None
    finally:
        c.stop()


def test_http_greedy_answers_with_the_eagle3_draft_equal_those_without_fp32(cluster) -> None:
    from openai import OpenAI

    drafted = cluster.client()
    plain = OpenAI(base_url=cluster.base + "/nodraft/v1", api_key="none", max_retries=0, timeout=600)
    assert [m.id for m in drafted.models.list().data] == ["smollm2"]
    assert [m.id for m in plain.models.list().data] == ["smollm2-nodraft"]
    answers = {}
    for name, client in (("eagle3", drafted), ("none", plain)):
        model = "smollm2" if name == "eagle3" else "smollm2-nodraft"
        answers[name] = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                        max_tokens=MAX_TOKENS, temperature=0) for p in PROMPTS]
    for prompt, a, b in zip(PROMPTS, answers["eagle3"], answers["none"]):
        assert a.choices[0].message.content == b.choices[0].message.content, prompt
        assert a.usage.completion_tokens == b.usage.completion_tokens > 0

    def accepted():
        counters = cluster.spec_counters()
        return counters if counters.get("accepted_tokens", 0) > 0 else None

    counters = wait_until(accepted, 60, "ray_vllm_spec_decode_num_accepted_tokens_total > 0", interval=2)
    assert counters["draft_tokens"] >= counters["accepted_tokens"] > 0 and counters["drafts"] > 0
    print(f"HTTP, fp32 greedy: {len(PROMPTS)}/{len(PROMPTS)} answers identical with and without the EAGLE-3 draft; "
          f"spec decode {counters} (acceptance {counters['accepted_tokens'] / counters['draft_tokens']:.2f})")
