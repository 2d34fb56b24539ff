"""The OpenAI wire format, the early_exit extension, stop strings, Serve args and every Serve YAML (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from layerexit.engine.options import ExitConfig
from layerexit.errors import ConfigError
from layerexit.serving.config import exit_config_from_user_config, parse_serve_args, served_name_for
from layerexit.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EarlyExitRequest,
    ExitStatsAccumulator,
    TextAssembler,
    exit_config_key,
    merge_exit_config,
    validation_error_to_api_error,
)

REPO = Path(__file__).resolve().parents[2]
# The engine backend's configs (import_path layerexit.serving.app); the vLLM backend's (smollm2_vllm.yaml, 7b.yaml,
# 13b.yaml) are checked in test_vllm_config.py.
SERVE_CONFIGS = sorted(p for p in (REPO / "serve_configs").glob("*.yaml")
                       if all(a["import_path"] != "layerexit.serving.vllm_backend:build_app"
                              for a in yaml.safe_load(p.read_text())["applications"]))
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def api_error(model, data) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return validation_error_to_api_error(info.value)


# ------------------------------------------------------------------------------------------ requests


def test_chat_request_accepts_what_the_openai_client_sends() -> None:
    req = ChatCompletionRequest.model_validate({
        **CHAT, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.9, "seed": 3, "stop": ["\n\n"], "n": 1,
        "stream": True, "stream_options": {"include_usage": True}, "user": "u", "metadata": {"k": "v"},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "early_exit": {"policy": "confidence", "thresholds": {"8": 0.9}},
    })
    assert req.max_tokens == 7 and req.include_usage() and req.stop_list() == ["\n\n"]
    assert req.chat_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert req.early_exit.thresholds == {8: 0.9}


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": -3}, "max_tokens"),
        ({**CHAT, "temperature": -0.1}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({**CHAT, "response_format": {"type": "json_object"}}, "response_format.type"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "temprature": 0.5}, "temprature"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({**CHAT, "early_exit": {"thresholds": {"8": 1.5}}}, "early_exit.thresholds"),
        ({**CHAT, "early_exit": {"thresholds": "paper-70b"}}, "early_exit.thresholds"),
        ({**CHAT, "early_exit": {"thresholds": "/etc/passwd"}}, "early_exit.thresholds"),
        ({**CHAT, "early_exit": {"polcy": "final"}}, "early_exit.polcy"),
        ({"messages": CHAT["messages"]}, "model"),
    ],
)
def test_bad_chat_requests_name_the_field(data, param) -> None:
    err = api_error(ChatCompletionRequest, data)
    assert err.status == 400 and err.param == param, err.message
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"


def test_completion_request_prompt_forms() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x"}).single_prompt() == "x"
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["x"]}).single_prompt() == "x"
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).single_prompt() == [1, 2]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2]]}).single_prompt() == [1, 2]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    assert api_error(CompletionRequest, {"model": "m", "prompt": []}).param == "prompt"
    assert api_error(CompletionRequest, {"model": "m", "prompt": "a", "best_of": 3}).param == "best_of"
    assert api_error(CompletionRequest, {"model": "m", "prompt": "a", "suffix": "z"}).param == "suffix"
    assert api_error(CompletionRequest, {"model": "m", "prompt": "a", "logprobs": 21}).param == "logprobs"
    # max_tokens 0 scores the prompt (OpenAI's echo semantics); without echo it is a 400 naming max_tokens
    echo0 = CompletionRequest.model_validate({"model": "m", "prompt": "a", "echo": True, "max_tokens": 0})
    assert echo0.max_tokens == 0 and echo0.echo
    assert api_error(CompletionRequest, {"model": "m", "prompt": "a", "max_tokens": 0}).param == "max_tokens"
    assert api_error(ChatCompletionRequest, {**CHAT, "max_tokens": 0}).param == "max_tokens"


# ----------------------------------------------------------------------------------------- early exit


def test_merge_exit_config_overrides_only_given_fields() -> None:
    default = ExitConfig(policy="confidence", thresholds={8: 0.9}, kv="recompute")
    assert merge_exit_config(default, None) is default
    assert merge_exit_config(default, EarlyExitRequest()) is default
    kv = merge_exit_config(default, EarlyExitRequest(kv="none"))
    assert (kv.policy, kv.thresholds, kv.kv) == ("confidence", {8: 0.9}, "none")
    fixed = merge_exit_config(default, EarlyExitRequest(policy="fixed", layer=2))
    assert (fixed.policy, fixed.layer) == ("fixed", 2)
    # switching away from `fixed` drops its layer
    back = merge_exit_config(fixed, EarlyExitRequest(policy="final"))
    assert back.layer is None and back.policy == "final"
    with pytest.raises(ValidationError):
        merge_exit_config(default, EarlyExitRequest(policy="fixed"))  # fixed needs a layer
    with pytest.raises(ValidationError):
        merge_exit_config(default, EarlyExitRequest(kv="sometimes"))
    assert exit_config_key(kv) != exit_config_key(default)
    assert exit_config_key(ExitConfig(policy="final")) == exit_config_key(ExitConfig(policy="final"))


def test_layers_the_model_lacks_are_config_errors() -> None:
    config = merge_exit_config(ExitConfig(), EarlyExitRequest(policy="confidence", thresholds={40: 0.5}))
    with pytest.raises(ConfigError, match="not intermediate layers"):
        config.build_policy(4)


def test_exit_stats() -> None:
    acc = ExitStatsAccumulator(ExitConfig(policy="confidence", thresholds={1: 0.5}), 4, {1: 0.5})
    for layer, flops in ((1, 10), (4, 40), (1, 10)):
        acc.add(layer, flops, 40)
    acc.batch_size = 3
    stats = acc.stats()
    assert stats.mean_exit_layer == pytest.approx(2.0)
    assert stats.exit_layer_histogram == {"1": 2, "4": 1}
    assert (stats.flops, stats.flops_full) == (60, 120)
    assert stats.flops_saved_fraction == pytest.approx(0.5)
    assert stats.batch_size == 3 and stats.thresholds == {"1": 0.5}
    empty = ExitStatsAccumulator(ExitConfig(), 4).stats()
    assert empty.mean_exit_layer is None and empty.flops_saved_fraction == 0.0


# ----------------------------------------------------------------------------------------- stop strings


@pytest.fixture(scope="module")
def tokenizer():
    from layerexit.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def feed(assembler: TextAssembler, ids: list[int]) -> str:
    out = ""
    for t in ids:
        delta, _ = assembler.add(t, 1)
        out += delta
        if assembler.stopped:
            return out
    return out + assembler.finish()[0]


def test_text_assembler_without_stops_reproduces_decode(tokenizer) -> None:
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    assert feed(TextAssembler(tokenizer), ids) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", ["fox", "o", "dog.", "quick brown", "not there"])
def test_text_assembler_cuts_at_the_stop_string(tokenizer, stop) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text)["input_ids"]
    assembler = TextAssembler(tokenizer, [stop, "zzz"])
    out = feed(assembler, ids)
    expected = text.split(stop)[0] if stop in text else text
    assert out == expected
    assert assembler.stopped == (stop in text)


def test_text_assembler_never_streams_past_a_stop(tokenizer) -> None:
    ids = tokenizer("Seven times six is forty-two.")["input_ids"]
    assembler = TextAssembler(tokenizer, ["forty"])
    streamed = ""
    for t in ids:
        delta, layers = assembler.add(t, 3)
        streamed += delta
        assert "forty" not in streamed and all(layer == 3 for layer in layers)
    assert streamed == "Seven times six is "


# ------------------------------------------------------------------------------------- args and configs


def test_serve_args_validation() -> None:
    args = parse_serve_args({"model": "smollm2", "max_batch_size": 4})
    assert args.max_batch_size == 4 and args.served_name() == "smollm2"
    with pytest.raises(ConfigError, match="max_batchsize"):
        parse_serve_args({"max_batchsize": 4})
    with pytest.raises(ConfigError, match="default_max_tokens"):
        parse_serve_args({"default_max_tokens": 600, "max_tokens_limit": 500})
    with pytest.raises(ConfigError, match="user_config"):
        parse_serve_args({"user_config": {"policy": "fast"}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_serve_args(["model"])  # type: ignore[arg-type]


def test_served_names(tmp_path) -> None:
    assert served_name_for("models:/layerexit-llama2_7b_lite@latest") == "layerexit-llama2_7b_lite"
    assert served_name_for("models:/layerexit-smollm2_lite/3") == "layerexit-smollm2_lite"
    assert served_name_for("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert served_name_for(str(tmp_path)) == tmp_path.name
    assert served_name_for("/x/SmolLM2.Q4.gguf") == "SmolLM2.Q4"


def test_user_config_thresholds_file_is_found_in_the_model_dir(tmp_path) -> None:
    (tmp_path / "thresholds.yaml").write_text(yaml.safe_dump(
        {"model": "tiny", "num_layers": 4, "exit_layers": [1, 2], "thresholds": {1: 0.9, 2: 0.8}}))
    config = exit_config_from_user_config({"policy": "confidence", "thresholds": "thresholds.yaml"}, tmp_path)
    assert config.resolved_thresholds(4)[0] == {1: 0.9, 2: 0.8}
    assert exit_config_from_user_config(None).policy == "final"
    with pytest.raises(ConfigError, match="thresholds"):
        exit_config_from_user_config({"policy": "confidence", "thresholds": {1: 2.0}})


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_every_serve_config_is_valid(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from layerexit.serving.app import build_app

    text = path.read_text()
    assert text.splitlines()[0] == f"# serve run serve_configs/{path.name}"
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    for app in config.applications:
        assert app.import_path == "layerexit.serving.app:build_app"
        args = parse_serve_args(app.args, f"{path.name} args")
        deployment = next(d for d in app.deployments if d.name == "EarlyExitLLM")
        exit_config_from_user_config(deployment.user_config)
        ongoing = deployment.max_ongoing_requests
        assert ongoing is None or ongoing >= args.max_batch_size
        assert build_app(app.args) is not None  # binds only; nothing loads


def test_smollm2_config_is_the_cpu_default() -> None:
    config = yaml.safe_load((REPO / "serve_configs" / "smollm2.yaml").read_text())
    app = config["applications"][0]
    assert app["args"]["model"] == "smollm2" and app["args"]["device"] == "cpu"
    assert "num_gpus" not in app["deployments"][0]["ray_actor_options"]


# Byte-level BPE splits these into tokens that are not whole characters (an emoji is 4 bytes over several tokens;
# skin-tone modifiers, combining accents, CJK, RTL ligatures), and special tokens inside an answer decode to nothing.
TRICKY = ["Héllo wörld 👍🏽 日本語 ﷽ e\u0301 \n\n  tabs\tand  spaces", "🤖🤖🤖 naïve café", "<|im_end|> after a special",
          "   leading spaces", "a\u200db 🇫🇷 flags", "x" * 3 + "👍" * 40]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.parametrize("text", TRICKY)
def test_streamed_text_equals_a_full_decode_on_tricky_tokens(smollm2_tokenizer, text) -> None:
    tok = smollm2_tokenizer
    ids = tok(text)["input_ids"]
    assert feed(TextAssembler(tok), ids) == tok.decode(ids, skip_special_tokens=True)
    # every prefix too: what has been streamed is always a prefix of the full decode, never a broken character
    assembler, streamed = TextAssembler(tok), ""
    for i, t in enumerate(ids, 1):
        streamed += assembler.add(t, 1)[0]
        assert tok.decode(ids[:i], skip_special_tokens=True).startswith(streamed) and "\ufffd" not in streamed


def test_streamed_text_equals_a_full_decode_on_random_ids(smollm2_tokenizer) -> None:
    """Random ids split characters anywhere (and never complete some): the stream still says what decode says."""
    import random

    tok, rng = smollm2_tokenizer, random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(tok)) for _ in range(24)]
        assert feed(TextAssembler(tok), ids) == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_a_stop_string_inside_a_split_character_is_found(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    ids = tok("thumbs 👍🏽 up and more")["input_ids"]
    assembler = TextAssembler(tok, ["🏽"])
    assert feed(assembler, ids) == "thumbs 👍" and assembler.stopped


def test_streaming_decodes_incrementally(smollm2_tokenizer, monkeypatch) -> None:
    """No full re-decode per token (O(n^2) over an answer): the tokenizer's decode is never called."""
    tok = smollm2_tokenizer
    ids = tok("The quick brown fox 🦊 jumps over the lazy dog. " * 60)["input_ids"]
    calls = []
    monkeypatch.setattr(type(tok), "decode", lambda self, *a, **k: calls.append(1) or "")
    text = feed(TextAssembler(tok), ids)
    assert not calls and text.count("🦊") == 60
