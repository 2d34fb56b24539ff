"""The teacher cache: round trip, fingerprint checks, atomic writes (a crashed build leaves nothing trusted)."""

from __future__ import annotations

import pytest
import torch

from layerexit.data.datasets import TokenizedExample
from layerexit.data.teacher_cache import (
    META, build_teacher_cache, read_cache, response_positions, write_cache,
)
from layerexit.errors import ConfigError
from layerexit.models.exits import collect_hidden_states, decoder_parts


def _examples(vocab: int, n: int = 5) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 8 + i
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [-100] * 4 + ids[4:]
        out.append(TokenizedExample(ids, labels, 4))
    return out


def test_round_trip_matches_the_model(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    examples = _examples(model.config.vocab_size)
    cache = build_teacher_cache("tiny", examples, k=4, temperature=2.0, layers=[2], precision="fp32",
                                directory=tmp_path / "c", model_and_tokenizer=(model, tok))
    assert cache.num_positions == sum(len(response_positions(e)) for e in examples)
    again = read_cache(tmp_path / "c", cache.meta["fingerprint"])
    for name in ("ids", "logp", "seq", "pos"):
        assert torch.equal(getattr(again, name), getattr(cache, name))
    assert torch.equal(again.hidden[2], cache.hidden[2])
    assert again.meta["size_bytes"] > 0 and again.meta["build_s"] >= 0
    # Spot-check one position against a direct forward pass.
    parts = decoder_parts(model)
    j = 7
    ex = examples[int(again.seq[j])]
    t = int(again.pos[j])
    with torch.no_grad():
        hidden = collect_hidden_states(model, torch.tensor([ex.input_ids]), [2, parts.num_layers])
        logp = torch.log_softmax(parts.head(parts.norm(hidden[parts.num_layers][0, t])) / 2.0, -1)
    top = logp.topk(4)
    assert again.ids[j].tolist() == top.indices.tolist()
    assert torch.allclose(again.logp[j], top.values, atol=1e-5)
    assert torch.allclose(again.hidden[2][j].float(), hidden[2][0, t], atol=2e-2, rtol=2e-2)
    # Asking again reads the cache instead of recomputing.
    third = build_teacher_cache("tiny", examples, k=4, temperature=2.0, layers=[2], precision="fp32",
                                directory=tmp_path / "c", model_and_tokenizer=(model, tok))
    assert third.meta["build_s"] == cache.meta["build_s"]


def test_cache_for_other_settings_or_data_is_rejected(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    examples = _examples(model.config.vocab_size)
    build_teacher_cache("tiny", examples, k=4, layers=[], precision="fp32", directory=tmp_path / "c",
                        model_and_tokenizer=(model, tok))
    with pytest.raises(ConfigError, match="another k"):
        build_teacher_cache("tiny", examples, k=8, layers=[], precision="fp32", directory=tmp_path / "c",
                            model_and_tokenizer=(model, tok))
    with pytest.raises(ConfigError, match="another data"):
        build_teacher_cache("tiny", examples[:3], k=4, layers=[], precision="fp32", directory=tmp_path / "c",
                            model_and_tokenizer=(model, tok))
    with pytest.raises(ConfigError, match="top_k"):
        build_teacher_cache("tiny", examples, k=10**6, layers=[], precision="fp32", directory=tmp_path / "d",
                            model_and_tokenizer=(model, tok))


def test_crashed_write_leaves_nothing_and_half_written_is_an_error(tmp_path, monkeypatch):
    import layerexit.data.teacher_cache as tc

    arrays = {"ids": torch.zeros(2, 3, dtype=torch.int32), "logp": torch.zeros(2, 3), "seq": torch.zeros(2, dtype=torch.int32),
              "pos": torch.zeros(2, dtype=torch.int32)}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError):
        write_cache(arrays, {"fingerprint": {}}, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "teacher.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match="not a complete teacher cache"):
        read_cache(tmp_path / "half")
    (tmp_path / "half" / META).write_text('{"fingerprint": {}}')
    with pytest.raises(ConfigError, match="cannot be read"):
        read_cache(tmp_path / "half")
    assert tc.FORMAT


def test_a_cache_with_more_layers_serves_a_request_for_fewer(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYEREXIT_HOME", str(tmp_path))
    model, tok = tiny_model_and_tokenizer
    examples = _examples(model.config.vocab_size)
    wide = build_teacher_cache("tiny", examples, k=4, layers=[1, 2], precision="fp32", model_and_tokenizer=(model, tok))
    narrow = build_teacher_cache("tiny", examples, k=4, layers=[], precision="fp32", model_and_tokenizer=(model, tok))
    assert narrow.path == wide.path and torch.equal(narrow.ids, wide.ids)
    other_k = build_teacher_cache("tiny", examples, k=3, layers=[], precision="fp32", model_and_tokenizer=(model, tok))
    assert other_k.path != wide.path


def test_gpu_cache_tasks_without_gpus_are_refused_naming_the_field(tiny_model_and_tokenizer, tiny_dir, tmp_path):
    """distill.cache_gpus > 0 on a Ray cluster without GPUs: a ConfigError before any task is queued (a GPU task
    would wait forever for a GPU that never comes), and nothing is written."""
    import ray

    model, tok = tiny_model_and_tokenizer
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ConfigError, match="distill.cache_gpus"):
            build_teacher_cache(str(tiny_dir), _examples(model.config.vocab_size), k=4, precision="fp32",
                                directory=tmp_path / "c", gpus_per_task=1, model_and_tokenizer=(model, tok))
    finally:
        ray.shutdown()
    assert not (tmp_path / "c").exists()


def test_the_teacher_pass_follows_the_models_device(tiny_model_and_tokenizer):
    """teacher_for_examples sends batches to the model's device and brings results back to the CPU (the GPU task's
    path, run here on the CPU device it generalises)."""
    from layerexit.data.teacher_cache import teacher_for_examples

    model, tok = tiny_model_and_tokenizer
    out = teacher_for_examples(model, _examples(model.config.vocab_size, 2), 0, 4, 1.0, [1], False)
    assert all(t.device.type == "cpu" for t in out.values()) and out["hidden_l1"].dtype == torch.bfloat16
