"""The Serve application over real HTTP on 127.0.0.1, deployed with `serve run` from serve_configs/smollm2.yaml
(the same file, with the tiny model in place of SmolLM2, small limits, one CPU and an API key).

One Ray cluster and one replica for the module; Serve and Ray are shut down at the end.
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from layerexit.localhost import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_CONFIG = REPO / "serve_configs" / "smollm2.yaml"
APP = "layerexit-smollm2"
MODEL = "tiny"
API_KEY = "test-key-0123456789"
KEY_ENV = "LAYEREXIT_TEST_API_KEY"
MAX_PROMPT = 64
MAX_TOKENS = 480
DEADLINE_S = 240


class Stack:
    def __init__(self, tmp: Path, model_dir: Path, http_port: int, metrics_port: int, gcs: str) -> None:
        self.tmp, self.model_dir, self.http_port, self.metrics_port, self.gcs = tmp, model_dir, http_port, metrics_port, gcs
        self.base = f"http://127.0.0.1:{http_port}"
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def config(self, user_config: dict | None = None) -> dict:
        """serve_configs/smollm2.yaml with the tiny model, small limits and an API key."""
        config = yaml.safe_load(SMOLLM2_CONFIG.read_text())
        config["http_options"]["port"] = self.http_port
        app = config["applications"][0]
        app["args"].update(model=str(self.model_dir), model_name=MODEL, torch_threads=1, max_prompt_tokens=MAX_PROMPT,
                           max_tokens_limit=MAX_TOKENS, default_max_tokens=16, request_timeout_s=60,
                           api_key_env=KEY_ENV, dtype="float32")  # exact comparisons below need fp32
        dep = app["deployments"][0]
        dep["ray_actor_options"] = {"num_cpus": 1, "runtime_env": {"env_vars": {KEY_ENV: API_KEY}}}
        if user_config is not None:
            dep["user_config"] = copy.deepcopy(user_config)
        return config

    def serve_run(self, config: dict, name: str) -> None:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        cli = Path(sys.executable).with_name("serve")
        proc = subprocess.run([str(cli), "run", str(path), "--non-blocking", "--address", self.gcs],
                              capture_output=True, text=True, timeout=180, cwd=self.tmp)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def wait_running(self) -> None:
        from ray import serve

        def running():
            status = serve.status().applications.get(APP)
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(status.message)
            return status is not None and status.status == "RUNNING"

        wait_until(running, DEADLINE_S, f"application {APP} RUNNING", interval=0.5)
        wait_until(lambda: self.get("/health").status_code == 200, 30, "/health")

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base + path, headers=self.headers, timeout=30, **kw)

    def post(self, path: str, json=None, **kw) -> httpx.Response:
        kw.setdefault("headers", self.headers)
        return httpx.post(self.base + path, json=json, timeout=60, **kw)

    def status(self) -> dict:
        return self.get("/v1/early_exit").json()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def async_client(self):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from layerexit.models.tiny import save_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_checkpoint(tmp / "tiny-model", num_layers=4)
    http_port, metrics_port = free_port(), free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    try:
        s = Stack(tmp, model_dir, http_port, metrics_port, ray.get_runtime_context().gcs_address)
        s.serve_run(s.config(), "serve.yaml")
        s.wait_running()
        yield s
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(stack: Stack, content: str = "What is two plus two?", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return stack.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def early_exit(obj) -> dict:
    return obj.model_extra["early_exit"]


# ------------------------------------------------------------------------------------------- OpenAI API


def test_models(stack: Stack) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert stack.client().models.retrieve(MODEL).id == MODEL


def test_chat_non_streaming(stack: Stack) -> None:
    resp = chat(stack, max_tokens=10)
    choice = resp.choices[0]
    assert resp.model == MODEL and resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 10 and resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    stats = early_exit(resp)
    assert stats["num_layers"] == 4 and sum(stats["exit_layer_histogram"].values()) == resp.usage.completion_tokens
    assert stats["flops_full"] > 0 and stats["batch_size"] >= 1


def test_chat_streaming_matches_non_streaming(stack: Stack) -> None:
    kw = {"max_tokens": 10, "early_exit": {"policy": "final"}}
    whole = chat(stack, max_tokens=10, extra_body={"early_exit": kw["early_exit"]})
    stream = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is two plus two?"}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"early_exit": kw["early_exit"]})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert early_exit(final)["mean_exit_layer"] == 4.0


def test_completion_streaming_and_not(stack: Stack) -> None:
    client = stack.client()
    whole = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # no usage chunk unless asked for
    plain = list(client.completions.create(model=MODEL, prompt="The quick", max_tokens=3, temperature=0, stream=True))
    assert all(c.choices for c in plain)


def test_stop_sequence_cuts_the_text(stack: Stack) -> None:
    full = chat(stack, max_tokens=24, extra_body={"early_exit": {"policy": "final"}}).choices[0].message.content
    visible = full.strip()
    if len(visible) < 4:
        pytest.skip(f"the tiny model produced too little text to cut: {full!r}")
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    resp = chat(stack, max_tokens=24, stop=[stop], extra_body={"early_exit": {"policy": "final"}})
    assert resp.choices[0].message.content == full[: full.find(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(stack: Stack) -> None:
    a = chat(stack, temperature=1.0, top_p=0.9, seed=7, max_tokens=8).choices[0].message.content
    b = chat(stack, temperature=1.0, top_p=0.9, seed=7, max_tokens=8).choices[0].message.content
    assert a == b


def test_n_choices_each_with_its_own_stats(stack: Stack) -> None:
    resp = chat(stack, n=3, temperature=1.5, seed=11, max_tokens=10)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 3
    per_choice = [c.model_extra["early_exit"] for c in resp.choices]
    assert all(1 <= sum(s["exit_layer_histogram"].values()) <= 10 for s in per_choice)
    assert resp.usage.completion_tokens == sum(sum(s["exit_layer_histogram"].values()) for s in per_choice)
    assert sum(early_exit(resp)["exit_layer_histogram"].values()) == resp.usage.completion_tokens
    # streaming: the same seeded choices, each delta tagged with its index, one finish chunk per choice
    chunks = list(stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is two plus two?"}], n=3, temperature=1.5, seed=11,
        max_tokens=10, stream=True))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)}
    assert [texts[i] for i in range(3)] == [c.message.content for c in resp.choices]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.choices[0].index for c in finals) == [0, 1, 2]
    assert all("exit_layer_histogram" in early_exit(c) for c in finals)


def test_prompt_list_gives_one_choice_per_prompt(stack: Stack) -> None:
    client = stack.client()
    prompts = ["The quick brown fox", "Once upon a time"]
    both = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                     extra_body={"early_exit": {"policy": "final"}})
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0,
                                       extra_body={"early_exit": {"policy": "final"}}).choices[0].text for p in prompts]
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == alone


def test_logprobs_on_chat_and_completions(stack: Stack) -> None:
    resp = chat(stack, logprobs=True, top_logprobs=3, max_tokens=6, extra_body={"early_exit": {"policy": "fixed",
                                                                                                "layer": 2}})
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert "exit layer" in early_exit(resp)["logprobs_from"]
    comp = stack.client().completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0,
                                             logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.token_logprobs) == comp.usage.completion_tokens == len(lp.tokens) == len(lp.text_offset)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    # greedy: each chosen token is the likeliest at its exit layer
    assert all(abs(v - max(t.values())) < 1e-5 for v, t in zip(lp.token_logprobs, lp.top_logprobs))
    # streamed chat log-probs arrive with their deltas
    chunks = list(stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, logprobs=True,
        stream=True, extra_body={"early_exit": {"policy": "fixed", "layer": 2}}))
    with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs]
    assert with_lp and all(len(c.choices[0].logprobs.content) == len(early_exit(c)["exit_layers"]) for c in with_lp)


def test_echo_scores_the_prompt_at_full_depth(stack: Stack) -> None:
    client = stack.client()
    ids = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=1, temperature=0,
                                    echo=True, logprobs=1)
    choice = ids.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("The quick brown fox")
    assert len(lp.token_logprobs) == ids.usage.prompt_tokens + ids.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "full-depth prefill" in early_exit(ids)["logprobs_from"]
    # max_tokens 0: the prompt only, same scores, nothing generated (lm-eval's loglikelihood requests)
    zero = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1)
    assert zero.choices[0].text == "The quick brown fox" and zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[: ids.usage.prompt_tokens]
    # prompt scores do not depend on the exit policy (prefill runs every layer)
    fixed = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1,
                                      extra_body={"early_exit": {"policy": "fixed", "layer": 1}})
    assert fixed.choices[0].logprobs.token_logprobs == zero.choices[0].logprobs.token_logprobs
    # a token-id prompt list, as lm-eval sends it
    batch = stack.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 1,
                                                "echo": True, "logprobs": 1, "temperature": 0}).json()
    assert [len(c["logprobs"]["token_logprobs"]) for c in batch["choices"]] == [4, 3]


def test_logprobs_with_self_speculative_are_from_the_final_layer(stack: Stack) -> None:
    spec = chat(stack, logprobs=True, max_tokens=6, extra_body={"early_exit": {"policy": "self-speculative",
                                                                               "layer": 2}})
    final = chat(stack, logprobs=True, max_tokens=6, extra_body={"early_exit": {"policy": "final"}})
    assert spec.choices[0].message.content == final.choices[0].message.content
    got = [t.logprob for t in spec.choices[0].logprobs.content]
    want = [t.logprob for t in final.choices[0].logprobs.content]
    assert got == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------------------------------- early exit


def test_per_request_early_exit_override_changes_exit_statistics(stack: Stack) -> None:
    final = early_exit(chat(stack, extra_body={"early_exit": {"policy": "final"}}))
    fixed = early_exit(chat(stack, extra_body={"early_exit": {"policy": "fixed", "layer": 1}}))
    conf = early_exit(chat(stack, extra_body={"early_exit": {"policy": "confidence", "thresholds": {"1": 0.0}}}))
    assert final["mean_exit_layer"] == 4.0 and final["flops_saved_fraction"] == 0.0
    assert set(final["exit_layer_histogram"]) == {"4"}
    assert fixed["mean_exit_layer"] == 1.0 and fixed["policy"] == "fixed"
    assert fixed["flops"] < final["flops"] and fixed["flops_saved_fraction"] > 0.3
    assert conf["mean_exit_layer"] == 1.0 and conf["thresholds"] == {"1": 0.0}


def test_sixteen_concurrent_requests_succeed_and_are_batched(stack: Stack) -> None:
    before = stack.status()["scheduler"]["batches"]

    async def main():
        client = stack.async_client()
        try:
            return await asyncio.gather(*(
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
                    max_tokens=12, temperature=0, extra_body={"early_exit": {"policy": "final"}})
                for i in range(16)))
        finally:
            await client.close()

    responses = asyncio.run(asyncio.wait_for(main(), 180))
    assert len(responses) == 16
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in responses)
    sizes = [early_exit(r)["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    status = stack.status()["scheduler"]
    assert status["batches"] - before < 16 and status["max_batch_size_seen"] > 1


def test_a_request_joins_a_running_stream_batch(stack: Stack) -> None:
    """Continuous batching over HTTP: a request sent while a long stream is decoding joins its batch."""
    before = stack.status()["scheduler"]

    async def main():
        client = stack.async_client()
        try:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Count slowly."}], max_tokens=MAX_TOKENS,
                temperature=0, stream=True, extra_body={"early_exit": {"policy": "final"}})
            late, content_chunks = None, 0
            async for chunk in stream:
                content_chunks += bool(chunk.choices and chunk.choices[0].delta.content)
                if late is None and content_chunks >= 3:  # the long one is decoding: send the second now
                    late = asyncio.create_task(client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                        extra_body={"early_exit": {"policy": "final"}}))
            assert late is not None, "the long answer ended before three content chunks"
            return await late
        finally:
            await client.close()

    late = asyncio.run(asyncio.wait_for(main(), 180))
    after = stack.status()["scheduler"]
    assert late.choices[0].finish_reason in ("stop", "length")
    assert after["joined_rows"] > before["joined_rows"]
    assert early_exit(late)["batch_size"] == 2


# ------------------------------------------------------------------------------------------- bad input

CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def with_(**kw) -> dict:
    return {**CHAT_OK, **kw}


BAD_REQUESTS = [
    ("malformed-json", b'{"model": "tiny", "messages": [', 400, None),
    ("not-an-object", b"[1, 2, 3]", 400, None),
    ("unknown-model", with_(model="gpt-9"), 404, "model"),
    ("max-tokens-zero", with_(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", with_(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-above-limit", with_(max_tokens=MAX_TOKENS + 1), 400, "max_tokens"),
    ("temperature-negative", with_(temperature=-0.5), 400, "temperature"),
    ("threshold-above-one", with_(early_exit={"thresholds": {"1": 1.5}}), 400, "early_exit.thresholds"),
    ("threshold-below-zero", with_(early_exit={"thresholds": {"2": -0.1}}), 400, "early_exit.thresholds"),
    ("threshold-missing-layer", with_(early_exit={"policy": "confidence", "thresholds": {"9": 0.5}}), 400,
     "early_exit"),
    ("fixed-layer-missing", with_(early_exit={"policy": "fixed", "layer": 12}), 400, "early_exit"),
    ("unknown-policy", with_(early_exit={"policy": "fastest"}), 400, "early_exit.policy"),
    ("unknown-preset", with_(early_exit={"thresholds": "paper-70b"}), 400, "early_exit.thresholds"),
    ("prompt-too-long", with_(messages=[{"role": "user", "content": "word " * 200}]), 400, "messages"),
    ("unknown-field", with_(temprature=0.2), 400, "temprature"),
    ("n-above-limit", with_(n=9), 400, "n"),
    ("top-logprobs-above-20", with_(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top-logprobs-without-logprobs", with_(top_logprobs=2), 400, "top_logprobs"),
    ("tools", with_(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("response-format-json", with_(response_format={"type": "json_object"}), 400, "response_format.type"),
    ("no-messages", {"model": MODEL}, 400, "messages"),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_with_an_openai_error(stack: Stack, name, body, status, param) -> None:
    if isinstance(body, bytes):
        resp = stack.post("/v1/chat/completions", content=body,
                          headers={**stack.headers, "Content-Type": "application/json"})
    else:
        resp = stack.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if name == "prompt-too-long":
        assert error["code"] == "context_length_exceeded"


def test_bad_completion_inputs(stack: Stack) -> None:
    base = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
    for body, param in (({**base, "prompt": "word " * 200}, "prompt"), ({**base, "prompt": [10**9]}, "prompt"),
                        ({**base, "suffix": "x"}, "suffix"), ({**base, "max_tokens": 0}, "max_tokens"),
                        ({**base, "prompt": ["a"] * 9}, "prompt"), ({**base, "prompt": ["a"] * 3, "n": 3}, "prompt"),
                        ({**base, "logprobs": 21}, "logprobs"), ({**base, "best_of": 2}, "best_of")):
        resp = stack.post("/v1/completions", json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_the_openai_client_sees_4xx_errors(stack: Stack) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        chat(stack, max_tokens=MAX_TOKENS + 1)
    assert info.value.status_code == 400 and info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        stack.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        chat(stack, stream=True, extra_body={"early_exit": {"thresholds": {"1": 7}}})


def test_api_key_is_required(stack: Stack) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = httpx.post(stack.base + "/v1/chat/completions", json=CHAT_OK, headers=headers, timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(stack.base + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(stack.base + "/health", timeout=30).status_code == 200  # probes need no key


def test_unknown_route_is_an_openai_style_404(stack: Stack) -> None:
    resp = stack.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert resp.status_code == 404 and "error" in resp.json()


def test_client_disconnect_mid_stream_stops_generation(stack: Stack) -> None:
    before = stack.status()["scheduler"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 450, "temperature": 0, "stream": True,
            "early_exit": {"policy": "final", "kv": "none"}}  # no KV cache: each step is slower, easy to catch
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", stack.base + "/v1/chat/completions", json=body, headers=stack.headers) as resp:
            assert resp.status_code == 200
            lines = 0
            for line in resp.iter_lines():
                lines += line.startswith("data: ")
                if lines >= 4:
                    break  # leave mid-stream: closing the response drops the connection
    after = wait_until(lambda: (s := stack.status()["scheduler"])["running_requests"] == 0
                       and s["running_batches"] == 0 and s, 30, "the abandoned generation to stop")
    assert after["cancelled_rows"] == before["cancelled_rows"] + 1
    assert after["steps"] - before["steps"] < 400, "generation kept running after the client left"
    # the replica is healthy and serves the next request
    assert stack.get("/health").status_code == 200
    assert chat(stack, max_tokens=3).usage.completion_tokens <= 3


def test_limits_are_reported(stack: Stack) -> None:
    status = stack.status()
    assert status["limits"]["request_timeout_s"] == 60 and status["limits"]["max_prompt_tokens"] == MAX_PROMPT


# ------------------------------------------------------------------------------------------- operations


def test_reconfigure_changes_the_default_thresholds_live(stack: Stack) -> None:
    first = stack.status()
    assert first["default_exit"]["policy"] == "final"  # serve_configs/smollm2.yaml: the best measured default
    assert first["default_thresholds"] != {"1": 0.0}

    stack.serve_run(stack.config({"policy": "confidence", "thresholds": {1: 0.0}, "kv": "recompute"}), "v2.yaml")
    now = wait_until(lambda: (s := stack.status())["default_thresholds"] == {"1": 0.0} and s, 120,
                     "the new thresholds")
    assert (now["replica"], now["pid"]) == (first["replica"], first["pid"])  # same replica: no restart
    assert early_exit(chat(stack))["mean_exit_layer"] == 1.0  # every token exits at layer 1

    never = {1: 1.0, 2: 1.0, 3: 1.0}
    stack.serve_run(stack.config({"policy": "confidence", "thresholds": never, "kv": "recompute"}), "v3.yaml")
    wait_until(lambda: stack.status()["default_thresholds"] == {"1": 1.0, "2": 1.0, "3": 1.0}, 120,
               "the strict thresholds")
    stats = early_exit(chat(stack))
    assert stats["mean_exit_layer"] == 4.0 and stats["thresholds"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert stack.status()["pid"] == first["pid"]


def test_metrics_endpoint_shows_the_counters(stack: Stack) -> None:
    chat(stack, max_tokens=4)
    wanted = [
        "ray_layerexit_requests_total",
        "ray_layerexit_prompt_tokens_total",
        "ray_layerexit_completion_tokens_total",
        "ray_layerexit_exit_layer_bucket",
        "ray_layerexit_flops_saved_total",
        "ray_layerexit_flops_spent_total",
        "ray_layerexit_time_to_first_token_seconds_bucket",
        "ray_layerexit_batch_size_bucket",
        "ray_layerexit_cancelled_requests_total",
    ]
    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"

    def scrape():
        text = httpx.get(url, timeout=10).text
        missing = [m for m in wanted if m not in text]
        return text if not missing else None

    text = wait_until(scrape, 60, "layerexit metrics on Ray's metrics port", interval=1.0)
    requests = [line for line in text.splitlines() if line.startswith("ray_layerexit_requests_total{")]
    assert any('status="200"' in line for line in requests) and any('status="400"' in line for line in requests)
    assert any('status="401"' in line for line in requests)
    assert 'model="tiny"' in requests[0]


def test_replica_logs_are_json_without_prompt_text(stack: Stack) -> None:
    import glob

    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001
    secret = "zebra-umbrella-7781"
    chat(stack, content=f"Remember {secret}", max_tokens=2)

    def lines():
        found = []
        for path in glob.glob(str(session / "logs" / "serve" / "replica_*.log")):
            found += [ln for ln in Path(path).read_text(errors="replace").splitlines() if '"event": "request"' in ln]
        return found if found else None

    logged = wait_until(lines, 30, "request log lines")
    assert all(secret not in ln for ln in logged)
    import json

    record = json.loads(logged[-1][logged[-1].index("{"):])
    assert {"request_id", "route", "status", "latency_s"} <= set(record)
    assert os.environ.get(KEY_ENV) is None  # the key lives in the replica's runtime_env only
