"""Instruction-tuning datasets: Alpaca (``instruction``/``input``/``output``) and chat (``messages``) records,
from the hub (``tatsu-lab/alpaca``) or local JSON/JSONL, turned into token ids with the loss on response tokens only.

Labels follow ``layerexit.losses``: unshifted, ``-100`` on prompt and padding positions.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from layerexit.errors import InputFileError

IGNORE_INDEX = -100
ALPACA_HUB_ID = "tatsu-lab/alpaca"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# The Stanford Alpaca prompt templates (Taori et al. 2023), used by the LITE paper's fine-tuning.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

RecordFormat = Literal["alpaca", "chat"]
Template = Literal["chat", "alpaca"]


@dataclass
class TokenizedExample:
    """One training sequence: ``labels[i] == input_ids[i]`` on response tokens, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens before the first response token (the prompt of the first assistant turn)
    # Distillation targets (teacher cache rows of this example): positions (n,), top-k ids (n, k), log-probs (n, k).
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_response_tokens(self) -> int:
        return sum(1 for y in self.labels if y != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    """What happened while tokenizing (reported, so silent data loss is visible)."""

    examples: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    response_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class PreparedData:
    """Tokenized train/eval splits plus the prompts used for alignment evaluation."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    eval_prompts: list[list[int]]
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- loading records


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def check_data_path(path: str) -> None:
    """Fail early (before any model or worker starts) when a local dataset path does not exist."""
    p = Path(path).expanduser()
    if p.exists():
        if p.is_file() and p.suffix.lower() not in (".json", ".jsonl"):
            raise InputFileError(f"dataset file {path} is not .json or .jsonl", "pass a JSON/JSONL file or a hub id")
        return
    if is_hub_id(path):
        return
    raise InputFileError(f"dataset path not found: {path}",
                         f"pass an existing .json/.jsonl file, a directory of them, or a hub id like {ALPACA_HUB_ID}")


def _read_json_file(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputFileError(f"{path}:{lineno}: malformed JSON ({err.msg})", "fix or remove that line") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})", "fix the file") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("train"))
    if not isinstance(data, list):
        raise InputFileError(f"{path}: expected a list of records (or {{\"data\": [...]}})", "store records as a JSON list")
    return data


def load_records(source: str, split: str = "train") -> list[dict]:
    """Records from a local .json/.jsonl file (or a directory of them) or a hub dataset id."""
    check_data_path(source)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
        if not files:
            raise InputFileError(f"dataset directory {source} holds no .json/.jsonl files", "point at a data file")
        records = [r for f in files for r in _read_json_file(f)]
    elif path.is_file():
        records = _read_json_file(path)
    else:
        records = _load_hub(source, split)
    if not records:
        raise InputFileError(f"dataset {source} holds no records", "check the file or dataset id")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise InputFileError(f"dataset {source}: record {bad} is not an object", "each record must be a JSON object")
    return records


def _load_hub(dataset_id: str, split: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not available here"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputFileError(
            f"could not load dataset {dataset_id!r} from the Hugging Face hub ({first})",
            "the hub may be unreachable: download it elsewhere and pass a local .json/.jsonl path as data.path",
        ) from None
    return [dict(r) for r in ds]


def detect_format(records: Sequence[dict], source: str = "dataset") -> RecordFormat:
    """``chat`` if records carry ``messages``, ``alpaca`` if they carry ``instruction``/``output``."""
    first = records[0]
    if "messages" in first:
        return "chat"
    if "instruction" in first or "output" in first:
        return "alpaca"
    raise InputFileError(
        f"{source}: records have neither 'messages' nor 'instruction'/'output' (keys: {sorted(first)[:8]})",
        "use Alpaca records {instruction, input, output} or chat records {messages: [{role, content}, ...]}",
    )


def validate_records(records: Sequence[dict], fmt: RecordFormat, source: str = "dataset") -> None:
    """Name the first record that lacks a needed column."""
    for i, rec in enumerate(records):
        if fmt == "alpaca":
            missing = [k for k in ("instruction", "output") if not isinstance(rec.get(k), str)]
            if missing:
                raise InputFileError(
                    f"{source}: record {i} lacks the column(s) {missing} needed for the Alpaca format",
                    "each record needs string fields 'instruction' and 'output' ('input' is optional)",
                )
        else:
            msgs = rec.get("messages")
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
            )
            if not ok:
                raise InputFileError(f"{source}: record {i} has no valid 'messages' list",
                                     "chat records look like {messages: [{role: user, content: ...}, ...]}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise InputFileError(f"{source}: record {i} has no assistant message to learn from",
                                     "each conversation needs at least one {role: assistant} turn")


def alpaca_user_text(rec: dict) -> str:
    """The user turn for an Alpaca record under a chat template: instruction, then input if present."""
    extra = (rec.get("input") or "").strip()
    return f"{rec['instruction'].strip()}\n\n{extra}" if extra else rec["instruction"].strip()


def alpaca_prompt(rec: dict) -> str:
    """The Alpaca template's prompt for one record."""
    extra = (rec.get("input") or "").strip()
    if extra:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=rec["instruction"].strip(), input=extra)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=rec["instruction"].strip())


def to_messages(rec: dict, fmt: RecordFormat) -> list[dict]:
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    return [{"role": "user", "content": alpaca_user_text(rec)}, {"role": "assistant", "content": rec["output"]}]


# ----------------------------------------------------------------------------------------------- tokenizing


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=False))


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_alpaca_template(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], int]:
    """Alpaca template: prompt text + response + EOS. Only single-turn (user, assistant) conversations."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
        raise InputFileError("the Alpaca template needs one user turn followed by one assistant turn",
                             "use data.template=chat for multi-turn conversations")
    prompt = _ids(tokenizer(alpaca_prompt({"instruction": turns[0]["content"]}), add_special_tokens=True))
    response = _ids(tokenizer(turns[1]["content"], add_special_tokens=False)) + _eos(tokenizer)
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response, len(prompt)


def tokenize_chat_template(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], int]:
    """Chat template: every assistant turn is a target (its tokens up to and including the end-of-turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputFileError("the tokenizer has no chat template", "use data.template=alpaca for this model")
    full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    first_prompt_len = None
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(before)] != before or full[: len(upto)] != upto:
            raise InputFileError("the chat template does not render conversations prefix by prefix",
                                 "use data.template=alpaca for this model")
        labels[len(before) : len(upto)] = full[len(before) : len(upto)]
        if first_prompt_len is None:
            first_prompt_len = len(before)
    return full, labels, first_prompt_len or len(full)


def tokenize_example(tokenizer, messages: list[dict], template: Template, max_length: int,
                     stats: TokenizeStats | None = None) -> TokenizedExample | None:
    """Tokenize one conversation; truncate to ``max_length``; None if no response token survives."""
    fn = tokenize_chat_template if template == "chat" else tokenize_alpaca_template
    ids, labels, prompt_len = fn(tokenizer, messages)
    return finish_example(ids, labels, prompt_len, max_length, stats)


def finish_example(ids: list[int], labels: list[int], prompt_len: int, max_length: int,
                   stats: TokenizeStats | None = None) -> TokenizedExample | None:
    stats = stats if stats is not None else TokenizeStats()
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
        stats.truncated += 1
    # Position 0 never has a label after the shift, so a target must sit at index >= 1.
    n = sum(1 for y in labels[1:] if y != IGNORE_INDEX)
    if n == 0:
        stats.dropped_no_response += 1
        return None
    stats.examples += 1
    stats.response_tokens += n
    return TokenizedExample(list(ids), list(labels), min(prompt_len, len(ids)))


def tokenize_alpaca_record(tokenizer, rec: dict) -> tuple[list[int], list[int], int]:
    """An Alpaca record under the Alpaca template: the Stanford "with input" template when ``input`` is non-empty
    (instruction and input in their own sections), the no-input template otherwise."""
    prompt = _ids(tokenizer(alpaca_prompt(rec), add_special_tokens=True))
    response = _ids(tokenizer(rec["output"], add_special_tokens=False)) + _eos(tokenizer)
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response, len(prompt)


def tokenize_records(tokenizer, records: Sequence[dict], fmt: RecordFormat, template: Template,
                     max_length: int) -> tuple[list[TokenizedExample], TokenizeStats]:
    stats = TokenizeStats()
    out = []
    for rec in records:
        if fmt == "alpaca" and template == "alpaca":
            ids, labels, prompt_len = tokenize_alpaca_record(tokenizer, rec)
            ex = finish_example(ids, labels, prompt_len, max_length, stats)
        else:
            ex = tokenize_example(tokenizer, to_messages(rec, fmt), template, max_length, stats)
        if ex is not None:
            out.append(ex)
    return out, stats


def prompt_ids_for(tokenizer, messages: list[dict], template: Template) -> list[int]:
    """Token ids of the conversation up to the first assistant turn, ready for generation."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if template == "chat":
        return _chat_ids(tokenizer, messages[:first], add_generation_prompt=True)
    user = next(m for m in messages[:first] if m["role"] == "user")
    return _ids(tokenizer(alpaca_prompt({"instruction": user["content"]}), add_special_tokens=True))


# ----------------------------------------------------------------------------------------------- splitting


def record_key(rec: dict) -> str:
    return str(rec["id"]) if "id" in rec else json.dumps(rec, sort_keys=True, ensure_ascii=False)


def in_eval_split(key: str, fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha1(f"layerexit-eval:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_records(records: Sequence[dict], eval_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split by a hash of each record (its ``id`` if it has one)."""
    train, held = [], []
    for rec in records:
        (held if in_eval_split(record_key(rec), eval_fraction, seed) else train).append(rec)
    if not train:
        raise InputFileError(f"eval_fraction={eval_fraction} left no training records", "lower data.eval_fraction")
    return train, held


# ----------------------------------------------------------------------------------------------- batching


def collate(examples: Sequence[TokenizedExample], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids with ``pad_id``, labels with -100, attention_mask 0 on padding."""
    width = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if examples and all(e.teacher is not None for e in examples):
        batch.update(collate_teacher(examples, width))
    return batch


def collate_teacher(examples: Sequence[TokenizedExample], width: int) -> dict[str, torch.Tensor]:
    """Teacher top-k per position, sequence axis LAST (``teacher_ids``/``teacher_logp`` (B, k, T), ``teacher_mask``
    (B, T)), so right-padding a batch along its last axis pads positions, whatever the tensor's rank."""
    k = examples[0].teacher[1].shape[1]
    ids = torch.zeros((len(examples), k, width), dtype=torch.long)
    logp = torch.zeros((len(examples), k, width), dtype=torch.float32)
    tmask = torch.zeros((len(examples), width), dtype=torch.float32)
    for i, e in enumerate(examples):
        pos, t_ids, t_logp = e.teacher
        ids[i, :, pos.long()] = t_ids.long().T
        logp[i, :, pos.long()] = t_logp.float().T
        tmask[i, pos.long()] = 1.0
    return {"teacher_ids": ids, "teacher_logp": logp, "teacher_mask": tmask}


def prepare_sft_data(tokenizer, source: str, *, template: Template = "chat", max_length: int = 512,
                     eval_fraction: float = 0.05, seed: int = 0, max_train_examples: int | None = None,
                     max_eval_examples: int | None = None, split: str = "train") -> PreparedData:
    """Load, validate, split and tokenize an Alpaca/chat dataset (hub id or local path)."""
    records = load_records(source, split)
    fmt = detect_format(records, source)
    validate_records(records, fmt, source)
    train_recs, eval_recs = split_records(records, eval_fraction, seed)
    if max_train_examples is not None:
        train_recs = train_recs[:max_train_examples]
    if max_eval_examples is not None:
        eval_recs = eval_recs[:max_eval_examples]
    train, train_stats = tokenize_records(tokenizer, train_recs, fmt, template, max_length)
    evals, eval_stats = tokenize_records(tokenizer, eval_recs, fmt, template, max_length)
    eval_prompts = [_ids(tokenizer(alpaca_prompt(r), add_special_tokens=True)) if fmt == "alpaca" and template == "alpaca"
                    else prompt_ids_for(tokenizer, to_messages(r, fmt), template) for r in eval_recs]
    return PreparedData(train, evals, eval_prompts, info={
        "source": source, "format": fmt, "template": template, "records": len(records),
        "train": train_stats.as_dict(), "eval": eval_stats.as_dict(),
    })
