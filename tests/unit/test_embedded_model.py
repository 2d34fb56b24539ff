"""The embedded SmolLM2: the cached plain checkpoint generates exactly what transformers generates from the
GGUF itself, loads in plain transformers, and fetching again is a no-op."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.model


def test_cached_checkpoint_matches_gguf_greedy(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerexit.data.prompts import format_prompt
    from layerexit.engine.reference import hf_greedy_generate
    from layerexit.models.embedded import locate_smollm2_gguf
    from layerexit.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.chat_template and "im_start" in tok.chat_template
    gguf = locate_smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    prompts = [format_prompt(tok, "What is the capital of France?"), format_prompt(tok, "Name a colour.")]
    ours = hf_greedy_generate(model, prompts, 12, tok.pad_token_id)
    theirs = hf_greedy_generate(ref, prompts, 12, tok.pad_token_id)
    assert ours == theirs
    assert "Paris" in tok.decode(ours[0])
    # Plain transformers, no layerexit code, loads the cached directory too.
    plain = AutoModelForCausalLM.from_pretrained(smollm2_path)
    assert torch.equal(plain.model.layers[3].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(smollm2_path).vocab_size == tok.vocab_size


def test_fetch_is_idempotent(smollm2_path):
    from layerexit.models.embedded import DONE_MARKER, fetch_smollm2

    before = (smollm2_path / "model.safetensors").stat().st_mtime_ns
    assert fetch_smollm2(show_progress=False) == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == before
    assert (smollm2_path / DONE_MARKER).is_file()
