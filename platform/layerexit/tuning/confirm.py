"""Real generation for threshold sets: the numbers a search reports come from here, not from traces.

``ModelWorker`` holds the model once (in the driver, or in a Ray actor holding a GPU) and does everything that
needs it: the final layer's greedy responses, traces along them, and early-exit generation of candidates.
``confirm_candidates`` runs candidates and scores them against the final layer's responses with the configured
quality metric (``layerexit.evaluation.similarity``) and the engine's own FLOPs counts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerexit.errors import ConfigError
from layerexit.tuning.pareto import Point


@dataclass
class ModelInfo:
    name: str
    num_layers: int
    flops: Any  # FlopsModel
    local_dir: str | None
    registered: tuple[str, str] | None  # (name, version) when the model came from the MLflow registry
    adapter_flops: dict[int, int] = field(default_factory=dict)  # per position, per exit layer with an adapter


class ModelWorker:
    """Loads the model once; every method takes and returns token ids or plain data (actor-friendly)."""

    def __init__(self, spec: str, dtype: str = "float32", device: str = "auto", show_progress: bool = True,
                 name: str | None = None) -> None:
        import torch

        from layerexit.engine.reference import eos_ids
        from layerexit.models.loading import load_model_and_tokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        load_spec, local_dir, registered = spec, None, None
        if spec.startswith(("models:/", "runs:/")):
            from layerexit.models.mlflow_source import _registered_version
            from layerexit.serving.model_source import resolve_model_source

            src = resolve_model_source(spec)
            load_spec, local_dir = src.load_spec, str(src.local_dir) if src.local_dir else None
            if spec.startswith("models:/"):
                registered = _registered_version(spec)
        self.model, self.tokenizer = load_model_and_tokenizer(load_spec, dtype=getattr(torch, dtype), device=device)
        self.eos = eos_ids(self.model, self.tokenizer)
        self.pad = int(self.tokenizer.pad_token_id)
        self.show_progress = show_progress
        from layerexit.engine.heads import adapter_flops
        from layerexit.models.exits import decoder_parts

        parts = decoder_parts(self.model)
        self._info = ModelInfo(name or _model_name(spec), int(self.model.config.num_hidden_layers),
                               _flops(self.model), local_dir, registered,
                               {int(l): adapter_flops(parts, int(l), 1) for l in parts.adapters})

    def info(self) -> ModelInfo:
        return self._info

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        from layerexit.data.prompts import format_prompt

        return [format_prompt(self.tokenizer, t) for t in texts]

    def decode(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(list(s), skip_special_tokens=True).strip() for s in sequences]

    def final_responses(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                        batch_size: int) -> list[list[int]]:
        from layerexit.engine.reference import hf_greedy_generate_batched

        return hf_greedy_generate_batched(self.model, prompt_ids, max_new_tokens, self.pad, batch_size=batch_size,
                                          eos=self.eos, show_progress=self.show_progress)

    def traces(self, prompt_ids, responses, layers: Sequence[int], keep_hidden: bool = False,
               check_heads: Mapping[str, Sequence[int] | None] | None = None):
        from layerexit.engine.traces import record_traces

        return record_traces(self.model, prompt_ids, responses, layers, show_progress=self.show_progress,
                             keep_hidden=keep_hidden, check_heads=dict(check_heads) if check_heads else None)

    def check_vocab(self, path: str | None, size: int, prompts: int, out_path: str) -> tuple[str, list[int]]:
        """(file, its first ``size`` ids) of the static check vocabulary: ``path`` checked against this model's
        tokenizer (ConfigError naming check_vocab / check_vocab_file), or, without one, built from the model's own
        greedy answers on ``prompts`` training-split instructions and saved to ``out_path``."""
        from layerexit.engine.heads import load_check_vocab, save_draft_vocab

        vocab = int(self.model.config.vocab_size)
        if not 1 <= size <= vocab:
            raise ConfigError(f"check_heads: check_vocab {size} (static:{size}) is outside 1..{vocab} (this model's "
                              "vocabulary)", f"use static:N with N <= {vocab}")
        if path is None:
            from layerexit.data.draft_vocab import build_for_model

            ids = build_for_model(self.model, self.tokenizer, size, limit=prompts, max_new_tokens=64,
                                  show_progress=self.show_progress)
            path = str(save_draft_vocab(out_path, ids, self.tokenizer))
        return path, load_check_vocab(path, size, vocab, tokenizer=self.tokenizer)

    def generate(self, prompt_ids: Sequence[Sequence[int]], exit_config: Mapping[str, Any], max_new_tokens: int,
                 batch_size: int = 1) -> dict[str, Any]:
        """Early-exit greedy generation; returns token ids, exit layers, FLOPs (decode, as the engine counts)."""
        from layerexit.engine.decode import EarlyExitEngine
        from layerexit.engine.options import ExitConfig, SamplingParams

        engine = EarlyExitEngine(self.model, self.eos, self.pad)
        cfg = ExitConfig.model_validate(dict(exit_config))
        sampling = SamplingParams(max_new_tokens=max_new_tokens)
        t0 = time.perf_counter()
        tokens, exits, flops, flops_full = [], [], 0, 0
        for i in range(0, len(prompt_ids), batch_size):
            for r in engine.generate(list(prompt_ids[i : i + batch_size]), cfg, sampling):
                tokens.append(r.token_ids)
                exits.append(r.exit_layers)
                flops += r.flops
                flops_full += r.flops_full
        return {"token_ids": tokens, "exit_layers": exits, "flops": flops, "flops_full": flops_full,
                "seconds": time.perf_counter() - t0}


def _model_name(spec: str) -> str:
    from pathlib import Path

    if spec.startswith("models:/"):
        return spec[len("models:/"):].split("@", 1)[0].split("/", 1)[0]
    if spec.endswith(".gguf") or Path(spec).expanduser().is_dir():
        return Path(spec).expanduser().resolve().stem if spec.endswith(".gguf") else Path(spec).resolve().name
    return spec


def _flops(model):
    from layerexit.engine.flops import FlopsModel

    return FlopsModel.from_config(model.config)


class WorkerHandle:
    """Calls a ModelWorker in this process, or in a Ray actor (``num_gpus > 0``) with the same methods."""

    def __init__(self, spec: str, dtype: str, device: str, num_gpus: float, show_progress: bool,
                 name: str | None = None) -> None:
        self.remote = num_gpus > 0
        if self.remote:
            import ray

            actor_cls = ray.remote(num_gpus=num_gpus, num_cpus=1)(ModelWorker)
            self._worker = actor_cls.remote(spec, dtype, device, show_progress, name)
        else:
            self._worker = ModelWorker(spec, dtype, device, show_progress, name)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        target = getattr(self._worker, method)
        if not self.remote:
            return target

        def call(*args, **kwargs):
            import ray

            return ray.get(target.remote(*args, **kwargs))

        return call

    def close(self) -> None:
        if self.remote:
            import ray

            ray.kill(self._worker)


# ------------------------------------------------------------------------------------------------ quality
def quality_scores(metric: str, ref_ids: Sequence[Sequence[int]], out_ids: Sequence[Sequence[int]],
                   ref_texts: Sequence[str], out_texts: Sequence[str]) -> list[float]:
    """Per-prompt quality of early-exit outputs against the final layer's, by ``metric``."""
    from layerexit.evaluation import similarity

    if metric == "agreement":
        return [similarity.token_agreement(a, b).agreement for a, b in zip(ref_ids, out_ids, strict=True)]
    if metric == "spacy":
        return similarity.spacy_similarities(ref_texts, out_texts)
    if metric == "minilm":
        return similarity.embedding_similarities(ref_texts, out_texts)
    raise ConfigError(f"unknown quality metric {metric!r}", "use agreement, spacy or minilm")


@dataclass
class Reference:
    """The final layer's responses on a prompt set (what every candidate is compared with)."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str]


def run_candidate(worker, ref: Reference, point: Point, exit_config: Mapping[str, Any], metric: str,
                  max_new_tokens: int, batch_size: int, kind: str = "confirmed",
                  second_metric: str | None = None) -> Point:
    """Generate with ``exit_config`` and score against the reference: FLOPs ratio and quality from real outputs."""
    out = worker.generate(ref.prompt_ids, dict(exit_config), max_new_tokens, batch_size)
    texts = worker.decode(out["token_ids"])
    scores = quality_scores(metric, ref.token_ids, out["token_ids"], ref.texts, texts)
    second = float(np.mean(quality_scores(second_metric, ref.token_ids, out["token_ids"], ref.texts, texts))) \
        if second_metric and second_metric != metric else None
    from layerexit.evaluation.similarity import token_agreement

    agreement = [token_agreement(a, b).agreement for a, b in zip(ref.token_ids, out["token_ids"], strict=True)]
    exits = np.concatenate([np.asarray(e) for e in out["exit_layers"] if len(e)]) if out["exit_layers"] else np.zeros(0)
    extra = {"agreement": float(np.mean(agreement)), "metric": metric, "seconds": round(out["seconds"], 2),
             "mean_exit_layer": float(exits.mean()) if len(exits) else None, "prompts": len(ref.prompt_ids),
             "identical": float(np.mean([a == b for a, b in zip(ref.token_ids, out["token_ids"], strict=True)])),
             "trace_flops_ratio": point.flops_ratio if point.extra.get("scored_on") == "traces" else None,
             "trace_agreement": point.quality if point.extra.get("scored_on") == "traces" else None,
             "scored_on": "generation", "policy": exit_config.get("policy"),
             **({"check_head": point.extra["check_head"]} if point.extra.get("check_head") else {}),
             **({second_metric: second} if second is not None else {})}
    ratio = out["flops"] / out["flops_full"] if out["flops_full"] else 1.0
    return Point(point.name, float(ratio), float(np.mean(scores)), dict(point.thresholds), kind, extra)


def check_fields(spec: str | None, check_vocab_file: str | None = None) -> dict[str, Any]:
    """ExitConfig fields of a check head spec (full, candidates:K, static:N)."""
    from layerexit.engine.traces import parse_check_spec

    if spec in (None, "full"):
        return {}
    head, size = parse_check_spec(spec)
    out: dict[str, Any] = {"check_head": head, "check_vocab": int(size)}
    if head == "static":
        out["check_vocab_file"] = check_vocab_file
    return out


def exit_config_for(point: Point, kv: str, classifier=None, probe=None,
                    check_vocab: int | str = "full", check_vocab_file: str | None = None) -> dict[str, Any]:
    """The engine ExitConfig (as a dict) a point stands for (``extra["policy"] == "probe"``: thresholds over
    ``probe``'s probabilities; ``check_vocab`` applies to confidence checks; ``extra["check_head"]``, a searched
    check head, wins over it)."""
    if point.kind == "classifier":
        return {"policy": "classifier", "classifier": classifier.model_dump(), "kv": kv}
    if not point.thresholds:
        return {"policy": "final", "kv": kv}
    table = {int(k): float(v) for k, v in point.thresholds.items()}
    if point.extra.get("policy") == "probe":
        if probe is None:
            raise ValueError(f"point {point.name} gates a probe, but no probe was given")
        return {"policy": "probe", "probe": probe.model_dump(), "thresholds": table, "kv": kv}
    out = {"policy": "confidence", "thresholds": table, "kv": kv}
    if point.extra.get("check_head"):
        out.update(check_fields(point.extra["check_head"], check_vocab_file))
    elif check_vocab != "full":
        out["check_vocab"] = int(check_vocab)
    return out


def confirm_candidates(worker, ref: Reference, candidates: Sequence[Point], metric: str, max_new_tokens: int,
                       batch_size: int = 1, kv: str = "recompute", classifier=None, kind: str = "confirmed",
                       log=None, probe=None, check_vocab: int | str = "full",
                       check_vocab_file: str | None = None, second_metric: str | None = None) -> list[Point]:
    """Run every candidate with real generation; returns confirmed points (real FLOPs ratio and quality;
    ``second_metric``'s mean in ``extra[second_metric]`` too)."""
    out = []
    for p in candidates:
        c = run_candidate(worker, ref, p, exit_config_for(p, kv, classifier, probe, check_vocab, check_vocab_file),
                          metric, max_new_tokens, batch_size, kind, second_metric)
        if log is not None:
            log(c)
        out.append(c)
    return out
