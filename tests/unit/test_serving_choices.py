"""Choices of a request (n, prompt lists), their log-probs and echo scores, the Alpaca chat format and the KV
budget: on the tiny model, through the real scheduler and engine (no Ray)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from layerexit.engine.decode import EarlyExitEngine
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.scoring import score_prompt
from layerexit.errors import ConfigError
from layerexit.serving.chat_format import ChatFormatError, alpaca_chat_text, chat_prompt_ids, choose_chat_format
from layerexit.serving.choices import collect, generate_choice, merge, plan_choices
from layerexit.serving.kv_budget import batch_reservation, check_kv_budget, kv_bytes_per_token
from layerexit.serving.logprobs import TokenScores, chat_logprobs, completion_logprobs
from layerexit.serving.protocol import ExitStatsAccumulator
from layerexit.serving.scheduler import BatchScheduler, GenerationRequest

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def engine(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    return EarlyExitEngine(model, set(), tokenizer.pad_token_id)


@pytest.fixture()
def scheduler(engine):
    sched = BatchScheduler(engine, max_batch_size=8, batch_wait_timeout_s=0.2, max_concurrent_batches=2).start()
    yield sched
    sched.stop()


def run_choices(scheduler, tokenizer, plans, config, streaming=False):
    stats = [ExitStatsAccumulator(config, scheduler.engine.L) for _ in plans]

    async def main():
        gens = [generate_choice(scheduler, tokenizer, p, config, s, [], 60, 0.0) for p, s in zip(plans, stats)]
        if not streaming:
            return await collect(gens)
        last = {}
        async with contextlib.aclosing(merge(gens)) as items:
            async for _text, _layers, outcome, done in items:
                if done:
                    last[outcome.index] = outcome
        return [last[i] for i in sorted(last)]

    return asyncio.run(main()), stats


@pytest.mark.parametrize("streaming", [False, True])
def test_n3_with_a_seed_gives_three_different_samples_and_three_stats(scheduler, tiny_model_and_tokenizer,
                                                                      streaming) -> None:
    _, tokenizer = tiny_model_and_tokenizer
    sampling = SamplingParams(max_new_tokens=12, temperature=1.5, seed=7)
    config = ExitConfig(policy="confidence", thresholds={1: 0.01, 2: 0.5})
    plans = plan_choices([(PROMPT, "")], 3, sampling)
    assert [p.index for p in plans] == [0, 1, 2] and [p.sampling.seed for p in plans] == [7, 8, 9]
    outcomes, stats = run_choices(scheduler, tokenizer, plans, config, streaming)
    samples = [tuple(tokenizer(o.text, add_special_tokens=False)["input_ids"]) for o in outcomes]
    assert len({o.text for o in outcomes}) == 3, samples  # three different samples
    assert [o.index for o in outcomes] == [0, 1, 2]
    per_choice = [s.stats() for s in stats]
    assert len(per_choice) == 3 and all(sum(st.exit_layer_histogram.values()) == 12 for st in per_choice)
    assert len({id(o.stats) for o in outcomes}) == 3
    # seeded: the same request again gives the same three samples
    again, _ = run_choices(scheduler, tokenizer, plan_choices([(PROMPT, "")], 3, sampling), config, streaming)
    assert [o.text for o in again] == [o.text for o in outcomes]
    merged = ExitStatsAccumulator.merged(stats).stats()
    assert sum(merged.exit_layer_histogram.values()) == 36 and merged.flops == sum(s.flops for s in per_choice)


def test_prompt_list_gives_one_choice_per_prompt_in_order(scheduler, engine, tiny_model_and_tokenizer) -> None:
    _, tokenizer = tiny_model_and_tokenizer
    prompts = [([5, 6, 7], "a"), ([9, 10], "b"), ([11], "c")]
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    plans = plan_choices(prompts, 2, greedy)
    assert [(p.index, p.prompt_ids) for p in plans] == [(0, [5, 6, 7]), (1, [5, 6, 7]), (2, [9, 10]),
                                                        (3, [9, 10]), (4, [11]), (5, [11])]
    outcomes, _ = run_choices(scheduler, tokenizer, plans, ExitConfig(policy="final"))
    expected = engine.generate([p for p, _ in prompts], ExitConfig(policy="final"), greedy)
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in expected]
    assert [o.text for o in outcomes] == [t for t in texts for _ in range(2)]


def test_logprobs_of_choices_are_the_exit_layers_log_softmax(scheduler, engine, tiny_model_and_tokenizer) -> None:
    """Choices carry the engine's per-token log-probs (log_softmax at each token's exit layer, ENGINE's test
    checks the values against the logits); here: one per token, the chosen token among the top-k, sorted."""
    _, tokenizer = tiny_model_and_tokenizer
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=3)
    config = ExitConfig(policy="fixed", layer=2)
    outcomes, _ = run_choices(scheduler, tokenizer, plan_choices([(PROMPT, "")], 1, sampling), config)
    scores = outcomes[0].scores
    assert len(scores) == 6
    assert all(lp is not None for lp in scores.logprobs) and all(len(top) == 3 for top in scores.top)
    model = engine.model
    ids = list(PROMPT)
    for tid, lp, top in zip(scores.ids, scores.logprobs, scores.top):
        with torch.inference_mode():
            hidden = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2]
            ref = torch.log_softmax(model.lm_head(model.model.norm(hidden[0, -1])).float(), -1)
        assert lp == pytest.approx(float(ref[tid]), abs=1e-4)
        assert [t for t, _ in top] == ref.topk(3).indices.tolist()
        assert tid == int(ref.argmax())  # greedy: the exit layer's own top token
        assert [v for _, v in top] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)
        ids.append(tid)


def test_score_prompt_is_the_full_depth_log_softmax(tiny_model_and_tokenizer) -> None:
    model, _ = tiny_model_and_tokenizer
    ids = [3, 17, 42, 8, 99, 5]
    scores = score_prompt(model, ids, top_k=2, chunk=2)  # chunk=2: the chunked head path is exercised
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert scores.logprobs[0] is None and scores.top[0] is None
    for i in range(1, len(ids)):
        assert scores.logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-5)
        assert [t for t, _ in scores.top[i]] == ref[i - 1].topk(2).indices.tolist()


def test_openai_logprob_shapes(tiny_model_and_tokenizer) -> None:
    _, tokenizer = tiny_model_and_tokenizer
    scores = TokenScores()
    scores.add(40, None, None)
    scores.add(41, -0.5, [(41, -0.5), (7, -1.5)])
    scores.add(42, -2.0, [(9, -0.1), (42, -2.0)])
    legacy = completion_logprobs(tokenizer, scores, 1)
    assert legacy.token_logprobs == [None, -0.5, -2.0] and legacy.top_logprobs[0] is None
    assert [len(t) for t in legacy.top_logprobs[1:]] == [1, 1]
    assert legacy.text_offset[0] == 0 and legacy.text_offset == sorted(legacy.text_offset)
    # lm-eval's greedy check: the chosen token's log-prob equals the best alternative's only when it is the best
    assert legacy.token_logprobs[1] == max(legacy.top_logprobs[1].values())
    assert legacy.token_logprobs[2] != max(legacy.top_logprobs[2].values())
    chat = chat_logprobs(tokenizer, scores.slice(1), 2)
    assert [c.logprob for c in chat.content] == [-0.5, -2.0] and len(chat.content[1].top_logprobs) == 2


# ------------------------------------------------------------------------------------------ chat format


def test_a_tokenizer_without_chat_template_gets_the_alpaca_training_prompt(tiny_model_and_tokenizer) -> None:
    from layerexit.data.datasets import alpaca_prompt

    _, tokenizer = tiny_model_and_tokenizer
    plain = type("NoTemplate", (), {"chat_template": None})()
    assert choose_chat_format("auto", plain) == "alpaca"
    assert choose_chat_format("auto", tokenizer, recorded="alpaca") == "alpaca"
    assert choose_chat_format("model", plain) == "model"
    messages = [{"role": "user", "content": "Name three colours."}]
    assert alpaca_chat_text(messages) == alpaca_prompt({"instruction": "Name three colours."})
    ids = chat_prompt_ids(tokenizer, messages, "alpaca")
    assert ids == tokenizer(alpaca_prompt({"instruction": "Name three colours."}), add_special_tokens=True)["input_ids"]
    multi = alpaca_chat_text([{"role": "system", "content": "Be brief."}, *messages,
                              {"role": "assistant", "content": "Red."}, {"role": "user", "content": "More?"}])
    assert multi.count("### Instruction:") == 2 and multi.endswith("### Response:\n") and "Be brief." in multi
    with pytest.raises(ChatFormatError):
        alpaca_chat_text([*messages, {"role": "assistant", "content": "Red."}])


# ------------------------------------------------------------------------------------------ KV budget


def test_kv_budget_larger_than_the_device_fails_naming_the_field(tiny_model_and_tokenizer) -> None:
    model, _ = tiny_model_and_tokenizer
    per_token = kv_bytes_per_token(model.config, torch.float32)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert per_token == (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim + cfg.hidden_size) * 4
    check_kv_budget(1000, per_token, weights_bytes=10, device_bytes=1000 * per_token + 10)  # fits exactly
    with pytest.raises(ConfigError, match="kv_budget_tokens") as info:
        check_kv_budget(1001, per_token, weights_bytes=10, device_bytes=1000 * per_token + 10)
    assert "at most 1000" in str(info.value)
    # LLaMA-2 7B in bf16: 0.5 MiB per position; the 7b_exits.yaml budget fits an 80 GB GPU beside 13.5 GB of weights
    llama7b = type("C", (), dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                                 num_hidden_layers=32))()
    assert kv_bytes_per_token(llama7b, torch.bfloat16) == (2 * 32 * 4096 + 4096) * 2
    assert batch_reservation([10, 30, 20]) == 90


def test_requests_beyond_the_kv_budget_queue_and_all_complete(engine) -> None:
    # each request reserves 4 + 8 = 12 positions; a budget of 30 admits two rows at a time
    sched = BatchScheduler(engine, max_batch_size=8, batch_wait_timeout_s=0.05, max_concurrent_batches=2,
                           kv_budget_tokens=30).start()
    peak = []
    config = ExitConfig(policy="final")
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)

    async def one(req):
        out = []
        async with contextlib.aclosing(sched.events(req, timeout_s=60)) as stream:
            async for batch in stream:
                peak.append(sched._kv_reserved())
                out.extend(ev.token_id for ev in batch.events)
        return out

    async def main():
        return await asyncio.gather(*(one(GenerationRequest(list(PROMPT), config, greedy)) for _ in range(6)))

    try:
        outs = asyncio.run(main())
    finally:
        sched.stop()
    expected = engine.generate([PROMPT], config, greedy)[0].token_ids
    assert outs == [expected] * 6
    assert max(peak) <= 30 and sched.kv_waits > 0 and sched.batches >= 2


def test_build_app_rejects_a_kv_budget_larger_than_this_machine(tiny_dir) -> None:
    from layerexit.serving.app import build_app

    with pytest.raises(ConfigError, match="kv_budget_tokens") as info:
        build_app({"model": str(tiny_dir), "device": "cpu", "kv_budget_tokens": 10**12})
    assert "at most" in str(info.value)
    build_app({"model": str(tiny_dir), "device": "cpu", "kv_budget_tokens": 4096})  # fits: an application


def test_training_template_is_read_from_the_registered_models_run(tmp_path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from layerexit.serving.chat_format import training_template

    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    # The replica reads the store its model came from, which model loading has just made the current one;
    # an earlier test may have set another store globally, so point the process at this one as loading would.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "data.template", "alpaca")
    client.create_registered_model("layerexit-x")
    version = client.create_model_version("layerexit-x", str(tmp_path / "artifacts"), run_id=run.info.run_id)
    try:
        assert training_template("models:/layerexit-x@trained", str(version.version)) == "alpaca"
    finally:
        mlflow.set_tracking_uri(previous)
    assert training_template("/a/local/dir", None) is None
    # a chat-template tokenizer still gets Alpaca when training used Alpaca
    assert choose_chat_format("auto", type("T", (), {"chat_template": "{{x}}"})(), recorded="alpaca") == "alpaca"
