"""Pydantic models for config files and the one loader that turns YAML + overrides into them.

Every model forbids unknown keys, so a typo is an error naming the field, not a silently ignored setting.
Later modules add their own config classes on top of ``StrictModel``; ``load_config`` handles them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layerexit.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    # Keys an earlier version of this section used -> the key that replaced them (one vocabulary across train,
    # tune, eval and serve configs). An old key is an error that names the new one, never silently ignored.
    RENAMED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.RENAMED:
            old = [key for key in cls.RENAMED if key in data]
            if old:
                raise ValueError("; ".join(f"`{key}` was renamed: write `{cls.RENAMED[key]}`" for key in old))
        return data


def coerce_cli_args(args: dict[str, Any], keep_strings: tuple[str, ...]) -> dict[str, Any]:
    """``serve run module:build_app key=value`` passes every value as a string: parse the JSON-looking ones
    (numbers, booleans, objects), except the keys in ``keep_strings`` (names and paths that may look like JSON)."""
    import json

    out = {}
    for key, value in args.items():
        if isinstance(value, str) and key not in keep_strings:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out

def one_of(value: str, choices, what: str) -> str:
    """Field check for a name from a fixed set; the error lists the choices."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
    return value


class LiteLossConfig(StrictModel):
    """How the LITE loss combines exits (paper section 3 and Appendix C)."""

    exit_layers: list[int] = Field(
        default_factory=list,
        description="Intermediate layers (1-based, excluding the final layer) that get a loss term.",
    )
    weights: str | list[float] = Field(
        "uniform",
        description="'uniform' (paper), 'increasing' (Appendix C), 'final_only' (standard IT), or one weight per "
        "exit layer followed by the final layer's.",
    )
    chunk_size: int | None = Field(
        128, ge=1, description="Sequence positions per LM-head chunk; bounds peak logits memory. null = unchunked."
    )
    distill_weight: float = Field(
        0.0, ge=0.0, description="Weight of KL(final || exit) self-distillation per exit; 0 disables it."
    )

    @field_validator("weights")
    @classmethod
    def _known_scheme(cls, value: str | list[float]) -> str | list[float]:
        if isinstance(value, str) and value not in ("uniform", "increasing", "final_only"):
            raise ValueError("must be 'uniform', 'increasing', 'final_only' or a list of numbers")
        return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value", "write overrides like train.lr=1e-4")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key", "write overrides like train.lr=1e-4")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides onto a nested dict (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section", "override a leaf value")
            node = nxt
        node[path[-1]] = value
    return data


# One vocabulary for the model across every config file: the serve args, the eval config, the train and tune
# configs all write ``model: <spec>`` (smollm2, a directory, a hub id, models:/name@alias) at the top level, beside
# ``model_name``, ``device``, ``dtype`` where they apply. Train and tune configs hold these in a ``model`` section
# internally (``cfg.model.spec``); the file never spells that section. File key -> section field where they differ:
MODEL_FILE_KEYS = {"model": "spec", "model_name": "name"}


def _model_section(model: type[BaseModel]) -> type[BaseModel] | None:
    """The class of ``model``'s ``model`` field when it is a section holding the spec, else None."""
    field = model.model_fields.get("model")
    annotation = getattr(field, "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and "spec" in annotation.model_fields:
        return annotation
    return None


def _file_key(section_field: str) -> str:
    return {v: k for k, v in MODEL_FILE_KEYS.items()}.get(section_field, section_field)


def lift_model_keys(model: type[BaseModel], data: dict[str, Any], source: str) -> dict[str, Any]:
    """A config file's top-level ``model``, ``model_name``, ``device``, ``dtype``, ``num_layers``... moved into the
    class's internal ``model`` section (a copy; classes without one get ``data`` back). The section spelled out in
    the file (``model: {spec: ...}``, the old vocabulary) is refused, naming the new keys."""
    section = _model_section(model)
    if section is None:
        return data
    given = data.get("model")
    if isinstance(given, dict):
        moves = ", ".join(f"model.{f} -> {_file_key(f)}" for f in given)
        raise ConfigError(f"invalid config {source}: the `model:` section was renamed: write `model: <spec>` at the "
                          f"top level and its options beside it ({moves})",
                          "e.g. `model: smollm2` and `num_layers: 30` instead of `model: {spec: smollm2, "
                          "num_layers: 30}`")
    out = dict(data)
    inner: dict[str, Any] = {}
    for name in section.model_fields:
        key = _file_key(name)
        if key in out and (key == "model" or key not in model.model_fields):
            inner[name] = out.pop(key)
    if inner or "model" in data:
        out["model"] = inner
    return out


def file_vocabulary(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``lift_model_keys``: an internal dict (``model: {spec: ...}``, e.g. a ``model_dump``) in the
    vocabulary config files are written in (``model: <spec>`` and its options at the top level)."""
    if not isinstance(data.get("model"), dict):
        return dict(data)
    out = {k: v for k, v in data.items() if k != "model"}
    return {**{_file_key(k): v for k, v in data["model"].items()}, **out}


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One readable line per problem: ``field.path: message`` (model-section fields by their file key)."""
    lines = []
    lifted = model is not None and _model_section(model) is not None
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        if lifted and len(parts) >= 2 and parts[0] == "model":
            parts = [_file_key(parts[1]), *parts[2:]]
        loc = ".".join(parts) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config class for allowed keys)"
        lines.append(f"{loc}: {msg}")
    return f"invalid config {source}: " + "; ".join(lines)


def validate_config(model: type[M], data: dict[str, Any], source: str = "<dict>") -> M:
    """Validate a config file's dict (the file vocabulary: ``model: <spec>`` at the top level) against a config
    class, raising ConfigError with every bad field named."""
    data = lift_model_keys(model, data, source)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model)) from None


def load_config(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Load a YAML file into ``model``, applying ``key=value`` overrides first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "check the --config path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    data = with_base(data, path)
    apply_overrides(data, overrides or [])
    return validate_config(model, data, str(path))


def merge_config(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def with_base(data: dict[str, Any], path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Resolve ``base: <file>`` (relative to the file naming it): the base's keys, overridden by this file's.
    Bases may have bases; a cycle is an error."""
    if "base" not in data:
        return data
    data = dict(data)
    ref = data.pop("base")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{path}: base must be a file name, got {ref!r}", "e.g. base: llama2_7b_lite.yaml")
    base_path = (path.parent / ref).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base {ref} includes itself", "remove the cycle of base: files")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base file not found: {base_path}", "base is relative to the file naming it")
    try:
        base = yaml.safe_load(base_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{base_path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path} must hold a mapping at the top level")
    base = with_base(base, base_path, (*seen, path.resolve()))
    return merge_config(base, data)
