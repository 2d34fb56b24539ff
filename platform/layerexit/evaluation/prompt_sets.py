"""Evaluation prompt sets: the project's held-out instructions (offline default) and the paper's test sets.

The paper evaluates on Vicuna (80), Koala (180), WizardLM (218) and Self-Instruct (252). Each loads from a
local JSONL file when ``path`` is given, else from its hub source when the hub is reachable. Records may use
any of the common schemas (``prompt`` / ``instruction`` / ``question`` / ``text`` / ``turns``, with an optional
``input`` or Self-Instruct's ``instances``, and ``category`` / ``motivation_app`` as the category).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerexit.data.prompts import Prompt
from layerexit.errors import InputFileError
from layerexit.evaluation.config import PromptSetConfig


@dataclass(frozen=True)
class HubSource:
    """Where a paper test set lives on the hub, and how many prompts it should have."""

    repo: str
    size: int
    config: str | None = None
    split: str = "train"
    data_files: str | None = None


# Best-known public copies; override with `hub:`/`data_files:` or point `path:` at a local JSONL.
PAPER_SETS: dict[str, HubSource] = {
    "vicuna": HubSource("Wanfq/KCA_data", 80, data_files="data/source/test/vicuna_testset_single_turn.jsonl"),
    "koala": HubSource("https://raw.githubusercontent.com/arnav-gudibande/koala-test-set/main/koala_test_set.jsonl",
                       180),
    "wizardlm": HubSource("Wanfq/KCA_data", 218, data_files="data/source/test/wizardlm_testset_single_turn.jsonl"),
    "self-instruct": HubSource("yizhongw/self_instruct", 252, config="human_eval"),
}
BUILTIN_SETS = ("heldout", *PAPER_SETS)

_TEXT_FIELDS = ("prompt", "instruction", "question", "text", "turns")
_CATEGORY_FIELDS = ("category", "motivation_app", "skills", "dataset")
_ID_FIELDS = ("id", "question_id", "idx")


def record_to_prompt(obj: Any, where: str) -> Prompt:
    """One record (dict) of any supported schema -> Prompt(text, {id, category}); errors name ``where``."""
    if not isinstance(obj, dict):
        raise InputFileError(f"{where}: expected a JSON object", 'each line must look like {"prompt": "..."}')
    text = None
    for key in _TEXT_FIELDS:
        value = obj.get(key)
        if isinstance(value, list):  # FastChat "turns": the first user turn
            value = value[0] if value and isinstance(value[0], str) else None
        if isinstance(value, str) and value.strip():
            text = value.strip()
            break
    if text is None:
        raise InputFileError(f"{where}: no non-empty text field (one of {', '.join(_TEXT_FIELDS)})",
                             'each record needs e.g. {"prompt": "..."}')
    extra_input = obj.get("input")
    instances = obj.get("instances")
    if not extra_input and isinstance(instances, dict):  # Self-Instruct human_eval: {"input": [...], ...}
        inputs = instances.get("input") or []
        extra_input = inputs[0] if inputs else None
    elif not extra_input and isinstance(instances, list) and instances and isinstance(instances[0], dict):
        extra_input = instances[0].get("input")
    if isinstance(extra_input, str) and extra_input.strip():
        text = f"{text}\n\n{extra_input.strip()}"
    extra: dict[str, Any] = {}
    for key in _ID_FIELDS:
        if obj.get(key) is not None:
            extra["id"] = obj[key]
            break
    for key in _CATEGORY_FIELDS:
        value = obj.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, str) and value.strip():
            extra["category"] = value.strip()
            break
    return Prompt(text, extra)


def read_prompt_jsonl(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """A local JSONL (or a JSON list) of records; clear errors for a missing, malformed or empty file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputFileError(f"prompt set file not found: {path}",
                             'pass a JSONL file with one {"prompt": ...} per line')
    raw = path.read_text(encoding="utf-8")
    records: list[tuple[str, Any]] = []
    if raw.lstrip().startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputFileError(f"{path}: malformed JSON ({err.msg})", "fix the file") from None
        records = [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]
    else:
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise InputFileError(f"{path}:{lineno}: malformed JSON ({err.msg})",
                                     "fix or remove that line") from None
    prompts = [record_to_prompt(obj, where) for where, obj in records]
    if not prompts:
        raise InputFileError(f"prompt set file {path} holds no prompts", 'add lines like {"prompt": "..."}')
    return prompts[:limit] if limit else prompts


def heldout_prompts() -> list[Prompt]:
    """The project's held-out instructions (never trained on), with id and category."""
    from layerexit.data.instructions import heldout_instructions

    return [Prompt(i.text, {"id": i.id, "category": i.category}) for i in heldout_instructions()]


def _load_hub(cfg: PromptSetConfig) -> list[Prompt]:
    source = PAPER_SETS.get(cfg.name)
    repo = cfg.hub or (source.repo if source else None)
    config = cfg.hub_config if cfg.hub_config is not None else (source.config if source and not cfg.hub else None)
    split = cfg.split or (source.split if source and not cfg.hub else "train")
    data_files = cfg.data_files or (source.data_files if source and not cfg.hub else None)
    hint = (f"download it and set prompt_sets: [{{name: {cfg.name}, path: /path/to/{cfg.name}.jsonl}}]")
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        if repo.startswith(("http://", "https://")) or repo.endswith((".json", ".jsonl")):
            ds = datasets.load_dataset("json", data_files=repo, split="train")
        elif data_files:
            ds = datasets.load_dataset("json", data_files=f"hf://datasets/{repo}/{data_files}", split="train")
        else:
            ds = datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # offline, unknown id, schema problems: one clear line either way
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputFileError(f"prompt set {cfg.name!r}: could not load {repo} from the hub ({first[:160]})",
                             hint) from None
    prompts = [record_to_prompt(dict(row), f"{repo}[{i}]") for i, row in enumerate(ds)]
    if not prompts:
        raise InputFileError(f"prompt set {cfg.name!r} from {repo} holds no prompts", hint)
    return prompts


def load_prompt_set(cfg: PromptSetConfig) -> list[Prompt]:
    """Resolve one prompt-set config to its prompts (non-empty, or an InputFileError naming the fix)."""
    if cfg.path:
        prompts = read_prompt_jsonl(cfg.path)
    elif cfg.name == "heldout" and not cfg.hub:
        prompts = heldout_prompts()
    elif cfg.name in PAPER_SETS or cfg.hub:
        prompts = _load_hub(cfg)
    else:
        raise InputFileError(f"unknown prompt set {cfg.name!r}",
                             f"use one of {', '.join(BUILTIN_SETS)}, or give it a `path` (local JSONL) or `hub` id")
    if not prompts:
        raise InputFileError(f"prompt set {cfg.name!r} is empty", "add prompts or choose another set")
    return spread_by_category(prompts, cfg.limit) if cfg.limit else prompts


def spread_by_category(prompts: list[Prompt], limit: int) -> list[Prompt]:
    """The first ``limit`` prompts taking categories in turn (file order within each), so a quick run still
    covers every category; plain first-N when the prompts have no categories."""
    if limit >= len(prompts) or not any(p.category for p in prompts):
        return prompts[:limit]
    queues: dict[str | None, list[Prompt]] = {}
    for p in prompts:
        queues.setdefault(p.category, []).append(p)
    out: list[Prompt] = []
    while len(out) < limit:
        for queue in queues.values():
            if queue and len(out) < limit:
                out.append(queue.pop(0))
    return out
