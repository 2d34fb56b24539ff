"""Datasets (Alpaca/chat, templates, masking, truncation, splits), the instruction set and self-distillation."""

from __future__ import annotations

import json

import pytest

from layerexit.data import datasets as ds
from layerexit.data.instructions import (
    Instruction,
    interleave_categories,
    load_instructions,
    split_instructions,
    write_heldout_prompts,
)
from layerexit.data.prompts import read_prompts
from layerexit.errors import InputFileError

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Two plus three is five."},
    {"instruction": "Say hello.", "output": "Hello there."},
]


@pytest.fixture(scope="module")
def tok():
    from layerexit.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _response_text(tok, ex):
    return tok.decode([i for i, y in zip(ex.input_ids, ex.labels) if y != ds.IGNORE_INDEX])


def test_alpaca_chat_template_masks_prompt(tok, tmp_path):
    records = ds.load_records(str(_write_jsonl(tmp_path / "a.jsonl", ALPACA)))
    assert ds.detect_format(records) == "alpaca"
    examples, stats = ds.tokenize_records(tok, records, "alpaca", "chat", max_length=512)
    assert stats.examples == 3 and stats.truncated == 0
    ex = examples[1]
    # Only the assistant turn (and its end-of-turn marker) carries labels; the prompt, with its input, does not.
    assert all(y == ds.IGNORE_INDEX for y in ex.labels[: ex.prompt_len])
    assert all(y == i for i, y in zip(ex.input_ids[ex.prompt_len:], ex.labels[ex.prompt_len:]))
    assert _response_text(tok, ex).startswith("Two plus three is five.")
    assert "2 and 3" in tok.decode(ex.input_ids[: ex.prompt_len])
    assert "<|im_start|>assistant" in tok.decode(ex.input_ids[: ex.prompt_len])


def test_alpaca_template_prompt_and_eos(tok):
    ids, labels, plen = ds.tokenize_alpaca_template(tok, ds.to_messages(ALPACA[1], "alpaca"))
    prompt = tok.decode(ids[:plen])
    assert "### Instruction:\nAdd the numbers.\n\n2 and 3" in prompt and prompt.rstrip().endswith("### Response:")
    assert labels[:plen] == [ds.IGNORE_INDEX] * plen
    assert labels[-1] == tok.eos_token_id and ids[plen:] == labels[plen:]
    no_input = ds.alpaca_prompt(ALPACA[0])
    assert "### Input" not in no_input and "Name a colour." in no_input


def test_chat_multi_turn_labels_every_assistant_turn(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    ex = ds.tokenize_example(tok, msgs, "chat", 512)
    text = _response_text(tok, ex)
    assert "Hello." in text and "Goodbye." in text
    assert "Hi" not in text and "Bye" not in text.replace("Goodbye", "")


def test_truncation_and_dropping(tok):
    stats = ds.TokenizeStats()
    long_answer = {"instruction": "Say it.", "output": "the sky " * 200}
    ex = ds.tokenize_example(tok, ds.to_messages(long_answer, "alpaca"), "chat", 40, stats)
    assert len(ex.input_ids) == 40 and stats.truncated == 1
    long_prompt = {"instruction": "the sea " * 200, "output": "ok"}
    assert ds.tokenize_example(tok, ds.to_messages(long_prompt, "alpaca"), "chat", 40, stats) is None
    assert stats.dropped_no_response == 1


def test_split_is_deterministic_and_disjoint():
    records = [{"instruction": f"q{i}", "output": "a"} for i in range(400)]
    train, held = ds.split_records(records, 0.2, seed=0)
    again = ds.split_records(records, 0.2, seed=0)
    assert (train, held) == again
    assert len(train) + len(held) == 400 and 50 < len(held) < 110
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in held}
    # Order-independent: a record's side does not depend on where it sits.
    assert ds.split_records(list(reversed(records)), 0.2)[1] == list(reversed(held))


def test_collate_pads_right(tok):
    a = ds.TokenizedExample([5, 6, 7], [-100, 6, 7], 1)
    b = ds.TokenizedExample([5, 6], [-100, 6], 1)
    batch = ds.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 6, -100]]


def test_json_list_and_data_key(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(ALPACA))
    (tmp_path / "d.json").write_text(json.dumps({"data": ALPACA}))
    assert len(ds.load_records(str(tmp_path / "l.json"))) == 3
    assert len(ds.load_records(str(tmp_path / "d.json"))) == 3


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(InputFileError, match="dataset path not found"):
        ds.load_records(str(tmp_path / "missing.jsonl"))
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    records = ds.load_records(str(bad))
    with pytest.raises(InputFileError, match=r"record 1 lacks the column\(s\) \['output'\]"):
        ds.validate_records(records, "alpaca", str(bad))
    with pytest.raises(InputFileError, match="neither 'messages' nor 'instruction'"):
        ds.detect_format([{"question": "q", "answer": "a"}])
    with pytest.raises(InputFileError, match="no assistant message"):
        ds.validate_records([{"messages": [{"role": "user", "content": "hi"}]}], "chat")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    with pytest.raises(InputFileError, match="broken.jsonl:2: malformed JSON"):
        ds.load_records(str(tmp_path / "broken.jsonl"))


def test_hub_unreachable_points_to_local_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'tatsu-lab/alpaca' on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputFileError, match="local .json/.jsonl path"):
        ds.load_records(ds.ALPACA_HUB_ID)


def test_prepare_sft_data_end_to_end(tok, tmp_path):
    rows = [{"instruction": f"Repeat {i}.", "output": f"{i} {i} {i}."} for i in range(60)]
    data = ds.prepare_sft_data(tok, str(_write_jsonl(tmp_path / "r.jsonl", rows)), eval_fraction=0.25,
                               max_length=64)
    assert len(data.train) + len(data.eval) == 60 and data.eval
    assert len(data.eval_prompts) == len(data.eval)
    assert all(p == e.input_ids[: len(p)] for p, e in zip(data.eval_prompts, data.eval))


# ----------------------------------------------------------------------------------------------- instruction set


def test_builtin_instructions_split_80_20_by_category():
    items = load_instructions()
    assert len(items) >= 300
    train, held = split_instructions(items)
    assert len(held) == round(0.2 * len(items)) or abs(len(held) - 0.2 * len(items)) <= len({i.category for i in items})
    assert not {i.id for i in train} & {i.id for i in held}
    cats = {i.category for i in items}
    assert cats == {i.category for i in held} == {i.category for i in train}
    assert split_instructions(list(reversed(items)))[1] == list(reversed(held))  # independent of file order


def test_heldout_prompt_file_is_readable(tmp_path):
    path = write_heldout_prompts(tmp_path / "heldout.jsonl")
    prompts = read_prompts(path)
    held = split_instructions(load_instructions())[1]
    assert [p.prompt for p in prompts] == [i.text for i in held]
    assert all(p.category for p in prompts)


def test_instruction_input_and_interleave(tmp_path):
    path = _write_jsonl(tmp_path / "i.jsonl", [
        {"id": 1, "category": "a", "prompt": "Summarise.", "input": "Long text."},
        {"id": 2, "category": "a", "prompt": "P2"}, {"id": 3, "category": "b", "prompt": "P3"},
    ])
    items = load_instructions(path)
    assert items[0].text == "Summarise.\n\nLong text." and items[0].id == "1"
    assert [i.id for i in interleave_categories(items)] == ["1", "3", "2"]
    _write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    with pytest.raises(InputFileError, match="duplicate id"):
        load_instructions(tmp_path / "dup.jsonl")


# ----------------------------------------------------------------------------------------------- self-distillation


def test_self_distill_generates_once_and_caches(tiny_dir, tmp_path, monkeypatch):
    from layerexit.data import selfdistill
    from layerexit.engine import reference
    from layerexit.models.loading import load_model_and_tokenizer

    monkeypatch.setenv("LAYEREXIT_HOME", str(tmp_path / "home"))
    items = [Instruction("a", "x", "Write a short poem about the sea."), Instruction("b", "x", "What is two plus two?")]
    calls = []
    real = reference.hf_greedy_generate_batched

    def counting(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(reference, "hf_greedy_generate_batched", counting)
    first, path = selfdistill.self_distill(str(tiny_dir), items, max_new_tokens=5, show_progress=False)
    assert calls == [2] and path.is_file() and str(path).startswith(str(tmp_path / "home" / "data"))
    # The cached answers are the model's own greedy tokens.
    model, tok = load_model_and_tokenizer(str(tiny_dir))
    direct = reference.hf_greedy_generate(model, [first[0].prompt_ids], 5, tok.pad_token_id,
                                          reference.eos_ids(model, tok))
    assert first[0].response_ids == direct[0]
    again, _ = selfdistill.self_distill(str(tiny_dir), items, max_new_tokens=5, show_progress=False)
    assert calls == [2] and [e.response_ids for e in again] == [e.response_ids for e in first]
    more = [*items, Instruction("c", "y", "Explain why the sky is blue.")]
    third, _ = selfdistill.self_distill(str(tiny_dir), more, max_new_tokens=5, show_progress=False)
    assert calls == [2, 1] and len(third) == 3  # only the new instruction was generated
    _, other = selfdistill.self_distill(str(tiny_dir), items[:1], max_new_tokens=6, show_progress=False)
    assert other != path  # different generation settings -> a different cache file
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_alpaca_with_input_gets_the_stanford_with_input_template(tok):
    rec = {"instruction": "Summarise the text.", "input": "The cat sat on the mat.", "output": "A cat sat."}
    ids, labels, plen = ds.tokenize_alpaca_record(tok, rec)
    prompt = tok.decode(ids[:plen])
    assert "### Input:" in prompt and "paired with an input" in prompt
    assert "The cat sat on the mat." in prompt.split("### Input:")[1]
    no_input = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    ids2, _, plen2 = ds.tokenize_alpaca_record(tok, no_input)
    assert "### Input:" not in tok.decode(ids2[:plen2])
    examples, _ = ds.tokenize_records(tok, [rec], "alpaca", "alpaca", max_length=512)
    assert examples[0].input_ids == ids
