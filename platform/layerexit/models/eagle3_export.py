"""The EAGLE-3 draft a model carries, exported as the checkpoint vLLM runs natively.

A model trained with the ``eagle3`` recipe carries its draft beside its weights: ``eagle3/`` (written by
:func:`layerexit.models.eagle3.save_eagle3`: vLLM's ``LlamaForCausalLMEagle3`` layout) and ``draft_settings.json``
with ``{"draft": "eagle3", "num_draft": k, ...}``. ``layerexit export-draft MODEL --out DIR`` turns that into a
standalone draft directory:

- ``config.json`` + ``model.safetensors``: vLLM's EAGLE-3 checkpoint (``fc``, ``midlayer.*``, ``norm``, ``lm_head``
  of ``draft_vocab_size`` rows, ``d2t``/``t2d``; ``eagle_config.eagle_aux_hidden_state_layer_ids``), cast to the dtype
  asked (``d2t``/``t2d`` keep their integer/bool types), checked against the layout by loading it back;
- the model's tokenizer files, so the serving checks compare tokenizers as they do for layer drafts;
- ``layerexit_draft.json``: ``kind: eagle3``, the draft length the model ships (``num_draft``), the aux layers, the
  draft vocabulary size, the target's shape (hidden size, depth, vocabulary) and the base model spec.

vLLM serves it with ``speculative_config={"method": "eagle3", "model": DIR, "num_speculative_tokens": k}``
(``layerexit.serving.vllm_backend`` builds that from ``draft: DIR`` or ``draft: shipped``).

Why our own writer and not the ``speculators`` package (vLLM's library for this checkpoint format), checked
2026-12-06 with ``pip install --dry-run -c requirements/lock.txt speculators``: speculators 0.9.0 requires
``datasets<=5.1.0`` and ``transformers<=5.19.0`` and hard-depends on ``torchvision`` and ``torchaudio``, while the lock
pins ``datasets==5.2.0`` and ``transformers==5.24.0`` (the project needs >= 5.24) and the torchvision/torchaudio
builds do not load against this torch (docs/serving.md); every release from 0.4.0 to 0.8.0 conflicts on ``datasets``
too, and pip falls back to 0.3.0, a year-old release that would pull deepspeed-era training code for a 20-key config.
The layout written here is vLLM's native one (the one the EAGLE-3 reference checkpoints use and speculators' own
format is mapped onto when vLLM loads it), and the integration test (tests/integration/test_vllm_eagle3.py) checks
that vLLM loads it and accepts its drafts.

Importable without torch (the serving checks in the main and the vLLM venv read only JSON); the export itself
imports torch and safetensors when it runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerexit.errors import ConfigError

EAGLE3_DIR = "eagle3"  # where a trained model carries its draft (training/eagle3_recipe.py)
ARCHITECTURE = "LlamaForCausalLMEagle3"  # = layerexit.models.eagle3.ARCHITECTURE (that module imports torch)
WEIGHTS_FILE = "model.safetensors"
DRAFT_META = "layerexit_draft.json"  # = draft_export.DRAFT_META: one meta file name for every exported draft
DRAFT_FORMAT = "layerexit-draft/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
DTYPES = ("float32", "bfloat16", "float16")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {what} {path} ({err})", "pass a directory written by layerexit") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object", "pass a directory written by layerexit")
    return data


def is_eagle3_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds an EAGLE-3 draft checkpoint vLLM loads (config architecture, JSON only)."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and ARCHITECTURE in (data.get("architectures") or [])


def ships_eagle3(model_dir: str | Path) -> bool:
    """Whether the model's ``draft_settings.json`` says its draft is EAGLE-3 (JSON only)."""
    path = Path(model_dir) / "draft_settings.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("draft") == "eagle3"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def carried_eagle3(model_dir: str | Path, field_name: str = "model") -> Path | None:
    """The EAGLE-3 draft directory ``model_dir`` carries (``eagle3/``), None when it carries none.

    A model whose draft settings say ``draft: eagle3`` but whose ``eagle3/`` is missing or not an EAGLE-3 checkpoint is
    an error naming ``field_name``."""
    root = Path(model_dir)
    candidate = root / EAGLE3_DIR
    if is_eagle3_checkpoint(candidate):
        return candidate
    if ships_eagle3(root):
        raise ConfigError(f"{field_name}: {root}/draft_settings.json names an EAGLE-3 draft but {candidate} is not an "
                          f"EAGLE-3 checkpoint (config.json with architectures [{ARCHITECTURE}])",
                          "re-run the training job's shipping step, or register the model again")
    return None


def shipped_num_draft(model_dir: str | Path) -> int | None:
    """``num_draft`` of the model's ``draft_settings.json`` (None when it has none)."""
    path = Path(model_dir) / "draft_settings.json"
    if not path.is_file():
        return None
    value = read_json(path, "draft settings").get("num_draft")
    return int(value) if value is not None else None


def model_shape(config: dict[str, Any]) -> dict[str, int | None]:
    """hidden size, depth and vocabulary of a Hugging Face config.json (``text_config`` when nested)."""
    c = config.get("text_config", config)
    return {"hidden_size": c.get("hidden_size"), "num_hidden_layers": c.get("num_hidden_layers"),
            "vocab_size": c.get("vocab_size")}


def eagle3_target_shape(config: dict[str, Any]) -> dict[str, int | None]:
    """The target shape an EAGLE-3 config was trained for: ``layerexit.spec`` when layerexit wrote it, else what vLLM's
    own keys say (``target_hidden_size``, ``vocab_size``; depth unknown)."""
    spec = (config.get("layerexit") or {}).get("spec") or {}
    return {"hidden_size": spec.get("target_hidden_size", config.get("target_hidden_size", config.get("hidden_size"))),
            "num_hidden_layers": spec.get("target_num_layers"),
            "vocab_size": spec.get("vocab_size", config.get("vocab_size"))}


def eagle3_aux_layers(config: dict[str, Any]) -> list[int] | None:
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = ((config.get("layerexit") or {}).get("spec") or {}).get("aux_layers")
    return None if ids is None else [int(i) for i in ids]


def check_eagle3_for_model(model_config: dict[str, Any], draft_config: dict[str, Any], field_name: str,
                           model_where: str, draft_where: str) -> None:
    """An EAGLE-3 draft must have been trained for this model's shape, read aux layers the model has and propose
    ids of its vocabulary; each failure is a ConfigError naming ``field_name``."""
    have, want = model_shape(model_config), eagle3_target_shape(draft_config)
    diff = [f"{k} {want[k]} vs the model's {have[k]}" for k in have
            if want[k] is not None and have[k] is not None and int(want[k]) != int(have[k])]
    fix = ("train an EAGLE-3 draft for this model (training recipe eagle3) and export it: "
           f"layerexit export-draft {model_where} --out DIR")
    if diff:
        raise ConfigError(f"{field_name}: the EAGLE-3 draft {draft_where} was trained for another model ("
                          + ", ".join(diff) + ")", fix)
    layers = have["num_hidden_layers"]
    aux = eagle3_aux_layers(draft_config)
    if aux is not None and layers is not None:
        bad = [a for a in aux if not 0 <= a <= int(layers)]  # vLLM: a = the residual stream after a layers
        if bad:
            raise ConfigError(f"{field_name}: the EAGLE-3 draft {draft_where} reads aux layers {bad}, out of range for "
                              f"the model's {layers} layers (eagle_aux_hidden_state_layer_ids: 0..{layers})", fix)
    vocab = have["vocab_size"]
    draft_vocab = draft_config.get("draft_vocab_size")
    if vocab is not None and draft_vocab is not None and int(draft_vocab) > int(vocab):
        raise ConfigError(f"{field_name}: the EAGLE-3 draft {draft_where} has draft_vocab_size {draft_vocab}, larger "
                          f"than the model's vocabulary ({vocab})", fix)


# ------------------------------------------------------------------------------------------------- export


@dataclass
class Eagle3Export:
    """What :func:`export_eagle3` wrote."""

    directory: Path
    dtype: str
    num_draft: int | None
    aux_layers: list[int]
    draft_vocab_size: int
    target: dict[str, int | None]
    base_model: str | None = None
    registered: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": DRAFT_FORMAT, "kind": "eagle3", "method": "eagle3", "num_draft": self.num_draft,
                "aux_layers": self.aux_layers, "draft_vocab_size": self.draft_vocab_size, "dtype": self.dtype,
                "target": self.target, "base_model": self.base_model}


def export_eagle3(model_dir: str | Path, out: str | Path, dtype: str | None = None,
                  base_spec: str | None = None) -> Eagle3Export:
    """Write the EAGLE-3 draft ``model_dir`` carries to ``out`` in ``dtype`` (default: as saved), atomically.

    Checks first: the draft was trained for this model (shape, aux layers, vocabulary), and ``out`` is new or an
    earlier exported draft. The written directory is loaded back (``load_eagle3``) before it replaces ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    from layerexit.models.eagle3 import load_eagle3
    from layerexit.tensor_dir import atomic_directory

    root = Path(model_dir)
    src = carried_eagle3(root)
    if src is None:
        raise ConfigError(f"{root} carries no EAGLE-3 draft ({root}/{EAGLE3_DIR} is missing)",
                          "train one with the eagle3 recipe, or export a layer draft with --layer L")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    model_config = read_json(root / "config.json", "model config")
    config = read_json(src / "config.json", "EAGLE-3 config")
    where = base_spec or str(root)
    check_eagle3_for_model(model_config, config, "model", where, str(src))
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / DRAFT_META).is_file())):
        raise ConfigError(f"--out {out} exists and is not a draft directory",
                          "pass a new or an earlier draft's directory")
    dtype = dtype or str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    if dtype not in DTYPES:
        raise ConfigError(f"{src}/config.json: dtype {dtype!r} is not supported", f"pass --dtype ({', '.join(DTYPES)})")
    torch_dtype = getattr(torch, dtype)
    tensors = load_file(str(src / WEIGHTS_FILE))
    cast = {name: (t if name in ("d2t", "t2d") or not t.is_floating_point() else t.to(torch_dtype)).contiguous()
            for name, t in tensors.items()}
    config = {**config, "dtype": dtype}
    config.pop("torch_dtype", None)
    info = Eagle3Export(out, dtype, shipped_num_draft(root), eagle3_aux_layers(config) or [],
                        int(config.get("draft_vocab_size") or config.get("vocab_size")), eagle3_target_shape(config),
                        base_spec)
    with atomic_directory(out) as tmp:
        save_file(cast, str(tmp / WEIGHTS_FILE))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, tmp / name)
        (tmp / DRAFT_META).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        load_eagle3(tmp)  # the layout vLLM loads: every weight present, none extra, shapes as the config says
    return info


def register_eagle3(info: Eagle3Export, model_uri: str, alias: str = "trained") -> dict:
    """Register the exported draft beside the MLflow model it came from: ``<name>-draft`` with ``alias`` (its own
    MLflow run in ``layerexit-drafts``, tags saying it is an EAGLE-3 draft and what for)."""
    import mlflow

    from layerexit.models.draft_export import registered_name
    from layerexit.tracking import log_hf_model

    name = registered_name(model_uri)
    tags = {"layerexit.draft.kind": "eagle3", "layerexit.draft.base_model": model_uri,
            "layerexit.draft.aux_layers": ",".join(map(str, info.aux_layers)),
            "layerexit.draft.draft_vocab_size": str(info.draft_vocab_size), "layerexit.draft.dtype": info.dtype}
    if info.num_draft is not None:
        tags["layerexit.draft.num_draft"] = str(info.num_draft)
    mlflow.set_experiment("layerexit-drafts")
    with mlflow.start_run(run_name=f"export-draft-{name}-eagle3"):
        mlflow.log_params({"kind": "eagle3", "base_model": model_uri, "num_draft": info.num_draft,
                           "aux_layers": ",".join(map(str, info.aux_layers)),
                           "draft_vocab_size": info.draft_vocab_size, "dtype": info.dtype})
        logged = log_hf_model(info.directory, registered_name=f"{name}-draft", alias=alias)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(f"{name}-draft", str(logged["version"]), key, value)
    return logged
