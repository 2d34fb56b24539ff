"""An exit as a plain draft checkpoint: the model's first l decoder layers, the exit's adapter (when it is made of
decoder layers), the final norm and the LM head, saved as an ordinary ``*ForCausalLM`` directory.

transformers loads it with ``from_pretrained`` (and runs it as ``assistant_model=`` for assisted generation) and
vLLM runs it as a draft model (``speculative_config={"model": DIR, ...}``) with no patch: lossless layer-skip
self-speculation on any server that takes a draft model. Its logits equal the engine's exit logits at layer l.

The directory also holds ``layerexit_draft.json``: the exit layer, the adapter kind, the base model's fingerprint
(config, embeddings, final norm, tokenizer) and, when measured, the draft's agreement with the final layer
(measured by ``layerexit.evaluation.draft_agreement``: this module sits below the engine and never runs it).
It is written into a temporary sibling and renamed into place, so a crash leaves no half-written draft.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from layerexit.errors import ConfigError
from layerexit.tensor_dir import atomic_directory

DRAFT_META = "layerexit_draft.json"
DRAFT_FORMAT = "layerexit-draft/1"


@dataclass
class DraftInfo:
    """What ``export_draft`` wrote."""

    directory: Path
    layer: int
    num_layers: int  # decoder layers in the draft: the exit layer plus the adapter's layers
    adapter: str | None  # adapter kind exported, or None
    fingerprint: dict[str, str]
    agreement: float | None = None
    registered: dict = field(default_factory=dict)
    measured_on: str | None = None  # "<device>/<dtype>" the agreement was measured with (bf16 can flip near-ties)

    def to_dict(self) -> dict:
        out = {"format": DRAFT_FORMAT, "layer": self.layer, "num_layers": self.num_layers, "adapter": self.adapter,
               "fingerprint": self.fingerprint, "agreement": self.agreement}
        if self.measured_on is not None:
            out["agreement_measured_on"] = self.measured_on
        return out


def draft_layers(model: nn.Module, layer: int) -> tuple[list[nn.Module], str | None]:
    """The decoder layers a draft at ``layer`` is made of (base layers 1..layer, then the adapter's) and the adapter
    kind; a clear error for a layer the model lacks or an adapter that is not made of decoder layers."""
    from layerexit.models.exits import decoder_parts

    parts = decoder_parts(model)
    L = parts.num_layers
    if not 1 <= layer < L:
        raise ConfigError(f"--layer {layer}: a draft needs an exit below the final layer (the model has {L} layers)",
                          f"choose a layer in 1..{L - 1}")
    layers = list(parts.layers[:layer])
    adapter = parts.adapters.get(layer)
    if adapter is None:
        return layers, None
    if getattr(adapter, "kind", "mlp") != "decoder_layer":
        raise ConfigError(
            f"the exit at layer {layer} has a {getattr(adapter, 'kind', 'mlp')} adapter, which is not made of standard "
            "decoder layers and so cannot be part of a plain checkpoint",
            "train the exit with adapters.kind: decoder_layer, or export a layer that has no adapter")
    return layers + list(adapter.layers), adapter.kind


def build_draft_model(model: nn.Module, layer: int) -> nn.Module:
    """A fresh ``*ForCausalLM`` of the model's class holding the draft's layers, final norm and head (copies)."""
    from layerexit.models.exits import decoder_parts

    parts = decoder_parts(model)
    layers, _ = draft_layers(model, layer)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention types (Qwen2, Mistral)
        config.layer_types = config.layer_types[:layer] + [config.layer_types[layer + j]
                                                           for j in range(len(layers) - layer)]
    dtype = parts.norm.weight.dtype
    draft = type(model)(config).to(dtype)
    dparts = decoder_parts(draft)
    with torch.no_grad():
        dparts.embed.load_state_dict(parts.embed.state_dict())
        dparts.norm.load_state_dict(parts.norm.state_dict())
        for dst, src in zip(dparts.layers, layers):
            dst.load_state_dict(src.state_dict())
        if not getattr(config, "tie_word_embeddings", False):
            dparts.head.load_state_dict(parts.head.state_dict())
    draft.tie_weights()
    draft.generation_config = model.generation_config
    return draft.eval()


def export_draft(model: nn.Module, tokenizer, layer: int, out: str | Path, agreement: float | None = None,
                 base_spec: str | None = None, measured_on: str | None = None) -> DraftInfo:
    """Write the draft at ``layer`` to ``out`` (config + safetensors + tokenizer + chat template + draft json).

    The model may sit on any device in any dtype: the draft is built on the CPU, in the model's dtype, from copies.
    ``measured_on`` records where ``agreement`` was measured (``"cuda/bfloat16"``)."""
    from layerexit.models.adapters import base_fingerprint

    _, kind = draft_layers(model, layer)
    draft = build_draft_model(model, layer)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / DRAFT_META).is_file():
        raise ConfigError(f"--out {out} exists and is not a draft directory", "pass a new or an earlier draft's directory")
    info = DraftInfo(out, layer, draft.config.num_hidden_layers, kind, base_fingerprint(model, tokenizer), agreement,
                     measured_on=measured_on)
    with atomic_directory(out) as tmp:
        draft.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = info.to_dict()
        if base_spec:
            meta["base_model"] = base_spec
        (tmp / DRAFT_META).write_text(json.dumps(meta, indent=2))
    return info


def read_draft_meta(directory: str | Path) -> dict | None:
    """The ``layerexit_draft.json`` of a draft directory, or None for a directory that has none."""
    path = Path(directory) / DRAFT_META
    return json.loads(path.read_text()) if path.is_file() else None


def register_draft(info: DraftInfo, model_uri: str, alias: str = "trained") -> dict:
    """Register the draft beside the MLflow model it came from: ``<name>-draft`` with ``alias`` and tags for the
    layer, the base model's fingerprint and the measured agreement (one MLflow run of its own)."""
    import mlflow

    from layerexit.tracking import log_hf_model

    name = registered_name(model_uri)
    tags = {"layerexit.draft.layer": str(info.layer), "layerexit.draft.num_layers": str(info.num_layers),
            "layerexit.draft.adapter": info.adapter or "none",
            "layerexit.base.fingerprint.model": info.fingerprint["model"],
            "layerexit.base.fingerprint.tokenizer": info.fingerprint["tokenizer"],
            "layerexit.draft.base_model": model_uri}
    if info.agreement is not None:
        tags["layerexit.draft.agreement"] = f"{info.agreement:.4f}"
    if info.measured_on is not None:
        tags["layerexit.draft.agreement_measured_on"] = info.measured_on
    mlflow.set_experiment("layerexit-drafts")
    with mlflow.start_run(run_name=f"export-draft-{name}-l{info.layer}"):
        mlflow.log_params({"layer": info.layer, "num_layers": info.num_layers, "base_model": model_uri})
        if info.agreement is not None:
            mlflow.log_metric("agreement", info.agreement)
        logged = log_hf_model(info.directory, registered_name=f"{name}-draft", alias=alias)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(f"{name}-draft", str(logged["version"]), key, value)
    return logged


def registered_name(model_uri: str) -> str:
    """``name`` of ``models:/name@alias`` or ``models:/name/3``; a clear error for other URIs."""
    if not model_uri.startswith("models:/"):
        raise ConfigError(f"{model_uri} is not a registered model URI",
                          "registration needs models:/<name>@<alias> or models:/<name>/<version>")
    rest = model_uri[len("models:/"):]
    return rest.split("@", 1)[0].split("/", 1)[0]
