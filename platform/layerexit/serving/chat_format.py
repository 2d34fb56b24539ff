"""How chat messages become prompt ids: the tokenizer's chat template, or the Alpaca template a LITE model was
fine-tuned with.

LLaMA-2 base tokenizers (the paper's 7B/13B LITE checkpoints) have no chat template, so ``/v1/chat/completions``
would have nothing to render messages with. Those models were trained with the Stanford Alpaca template
(``data.template: alpaca`` in ``jobs/configs/llama2_*_lite.yaml``; the training run records it as the MLflow
param ``data.template``), so the server renders chats the same way:

    ### Instruction:\\n<user turn>\\n\\n### Response:\\n<assistant turn>\\n\\n### Instruction: ...

A system message replaces nothing (the Alpaca preamble is what the model saw in training); it is prepended to
the first instruction.
"""

from __future__ import annotations

import logging
from typing import Literal

from layerexit.data.datasets import ALPACA_PROMPT_NO_INPUT

logger = logging.getLogger("ray.serve")

ChatFormat = Literal["model", "alpaca"]
_PREAMBLE, _ = ALPACA_PROMPT_NO_INPUT.split("### Instruction:", 1)


class ChatFormatError(ValueError):
    """The messages cannot be rendered with this format (the server answers 400 naming ``messages``)."""


def training_template(model_spec: str, version: str | None) -> str | None:
    """The ``data.template`` param of the training run behind a registered MLflow model version, if any."""
    if not model_spec.startswith("models:/") or version is None:
        return None
    try:
        from mlflow import MlflowClient

        name = model_spec[len("models:/"):].split("@", 1)[0].split("/", 1)[0]
        client = MlflowClient()
        run_id = client.get_model_version(name, version).run_id
        return client.get_run(run_id).data.params.get("data.template") if run_id else None
    except Exception as err:  # noqa: BLE001 - the store may not have it; fall back to the tokenizer
        logger.warning("could not read data.template of %s v%s: %s", model_spec, version, err)
        return None


def choose_chat_format(setting: str, tokenizer, recorded: str | None = None) -> ChatFormat:
    """``auto``: what training recorded (``alpaca`` or ``chat``), else the tokenizer's chat template when it has
    one, else Alpaca (the LITE paper's template). ``model``/``alpaca`` force one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "alpaca":
        return "alpaca"
    if setting == "model":
        return "model"
    if recorded == "alpaca" or not has_template:
        return "alpaca"
    return "model"


def alpaca_chat_text(messages: list[dict[str, str]]) -> str:
    """Messages (system?, user, assistant, user, ...) rendered with the Alpaca template, ending at the response
    the model is to write."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system").strip()
    turns = [m for m in messages if m["role"] in ("user", "assistant", "tool")]
    if not turns or turns[-1]["role"] == "assistant":
        raise ChatFormatError("the Alpaca chat format needs the conversation to end with a user message")
    parts, first = [_PREAMBLE], True
    for m in turns:
        if m["role"] == "assistant":
            parts.append(f"{m['content'].strip()}\n\n")
            continue
        text = m["content"].strip()
        if first and system:
            text = f"{system}\n\n{text}"
        first = False
        parts.append(f"### Instruction:\n{text}\n\n### Response:\n")
    return "".join(parts)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], fmt: ChatFormat) -> list[int]:
    """Prompt ids for a chat request; raises ChatFormatError when the messages cannot be rendered."""
    if fmt == "alpaca":
        return list(tokenizer(alpaca_chat_text(messages), add_special_tokens=True)["input_ids"])
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as err:  # noqa: BLE001 - jinja TemplateError (e.g. roles must alternate)
        raise ChatFormatError(f"The chat template rejected these messages: {err}") from None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
