"""The teacher cache: the frozen base model's top-k next-token distribution at every response position of a
training set, computed once (Ray tasks over shards of the data) and stored with a fingerprint.

One cache is a directory::

    teacher.safetensors   ids (N, k) int32, logp (N, k) float32 (log-probs at temperature T over the full vocab),
                          seq (N,) int32 example index, pos (N,) int32 position (predicts token pos + 1),
                          hidden_l<l> (N, H) bfloat16 for each requested exit layer (the adapters recipe trains on
                          these; the base model is frozen, so they never change; layer l is the residual stream
                          after l decoder layers, Hugging Face's ``hidden_states[l]``)
    meta.json             fingerprint {model, tokenizer, data, k, temperature, layers, precision}, sizes, build time

``positions="response"`` (default) caches the positions whose next token is a response token; ``"all"`` caches
every position of every sequence in order (the EAGLE-3 recipe: a feature draft attends over the prompt's features
too, and its training-time test reads the teacher several positions ahead), so an example's rows are contiguous.

It is written into a temporary sibling directory that is renamed into place only when complete, so a crashed
build leaves nothing a later run would trust; ``meta.json`` is the last file written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerexit.data.datasets import IGNORE_INDEX, TokenizedExample
from layerexit.errors import ConfigError
from layerexit.home import layerexit_home
from layerexit.tensor_dir import write_tensor_dir

WEIGHTS = "teacher.safetensors"
META = "meta.json"
FORMAT = "layerexit-teacher-cache/1"


@dataclass
class TeacherCache:
    """Teacher top-k per position (and optionally the base model's exit hidden states at those positions)."""

    ids: torch.Tensor  # (N, k) int32
    logp: torch.Tensor  # (N, k) float32
    seq: torch.Tensor  # (N,) int32
    pos: torch.Tensor  # (N,) int32
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, H) bfloat16
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def size_bytes(self) -> int:
        tensors = [self.ids, self.logp, self.seq, self.pos, *self.hidden.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def data_fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """Hash of every example's token ids and labels (order included)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return h.hexdigest()[:32]


def cache_fingerprint(model_fp: dict, examples: Sequence[TokenizedExample], k: int, temperature: float,
                      layers: Sequence[int], precision: str, positions: str = "response") -> dict:
    fp = {"format": FORMAT, "model": model_fp["model"], "tokenizer": model_fp["tokenizer"],
          "data": data_fingerprint(examples), "k": int(k), "temperature": float(temperature),
          "layers": sorted(int(l) for l in layers), "precision": precision}
    if positions != "response":  # only when not the default, so caches written before this key still match
        fp["positions"] = positions
    return fp


def default_cache_dir(fingerprint: dict) -> Path:
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return layerexit_home() / "teacher_cache" / f"{fingerprint['model'][:8]}-{key}"


# ----------------------------------------------------------------------------------------------- computing


def response_positions(ex: TokenizedExample) -> list[int]:
    """Positions t whose next token t+1 is a response token (the positions every loss is computed at)."""
    return [t for t in range(len(ex.labels) - 1) if ex.labels[t + 1] != IGNORE_INDEX]


def cached_positions(ex: TokenizedExample, positions: str) -> list[int]:
    """The positions of ``ex`` a cache of kind ``positions`` holds ("response" or "all")."""
    return list(range(len(ex.input_ids))) if positions == "all" else response_positions(ex)


@torch.no_grad()
def teacher_for_examples(model, examples: Sequence[TokenizedExample], offset: int, k: int, temperature: float,
                         layers: Sequence[int], autocast: bool, batch_size: int = 8, pad_id: int = 0,
                         positions: str = "response", head_chunk: int = 1024) -> dict:
    """Top-k of the final layer (and the ``layers``' hidden states) at every response position of ``examples``
    (``positions="all"``: at every position)."""
    from layerexit.data.datasets import collate
    from layerexit.losses.distill import teacher_topk
    from layerexit.models.exits import collect_hidden_states, decoder_parts

    parts = decoder_parts(model)
    L = parts.num_layers
    device = parts.head.weight.device  # a GPU task's model sits on its GPU: batches go there, results come back
    out: dict[str, list] = {"ids": [], "logp": [], "seq": [], "pos": [], **{f"hidden_l{l}": [] for l in layers}}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = collect_hidden_states(model, batch["input_ids"].to(device), [*layers, L],
                                           batch["attention_mask"].to(device))
        rows, cols = [], []
        for i, ex in enumerate(chunk):
            p = cached_positions(ex, positions)
            rows += [i] * len(p)
            cols += p
            out["seq"].append(torch.full((len(p),), offset + start + i, dtype=torch.int32))
            out["pos"].append(torch.tensor(p, dtype=torch.int32))
        r = torch.tensor(rows, dtype=torch.long, device=device)
        c = torch.tensor(cols, dtype=torch.long, device=device)
        final = hidden[L][r, c]  # Shape: (n, H), the cached positions only
        for s0 in range(0, final.shape[0], head_chunk):  # the full head in chunks: (chunk, V) logits at a time
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = parts.head(parts.norm(final[s0 : s0 + head_chunk]))
            ids, logp = teacher_topk(logits, k, temperature)
            out["ids"].append(ids.to(torch.int32).cpu())
            out["logp"].append(logp.float().cpu())
        for l in layers:
            out[f"hidden_l{l}"].append(hidden[l][r, c].to(torch.bfloat16).cpu())
    return {name: torch.cat(v) if v else torch.empty(0) for name, v in out.items()}


def _shard_task(model_spec: str, examples: list[TokenizedExample], offset: int, k: int, temperature: float,
                layers: list[int], precision: str, threads: int, positions: str = "response",
                gpu: bool = False) -> dict:
    torch.set_num_threads(threads)
    from layerexit.models.loading import load_model_and_tokenizer

    if gpu:  # Ray gave this task a GPU (CUDA_VISIBLE_DEVICES): bf16 weights there, the teacher's prefill on it
        model, tok = load_model_and_tokenizer(model_spec, dtype=torch.bfloat16, device="cuda")
        return teacher_for_examples(model, examples, offset, k, temperature, layers, False, batch_size=4,
                                    pad_id=tok.pad_token_id, positions=positions)

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, tok = load_model_and_tokenizer(model_spec, dtype=dtype)
    return teacher_for_examples(model, examples, offset, k, temperature, layers, precision == "autocast_bf16",
                                pad_id=tok.pad_token_id, positions=positions)


# ----------------------------------------------------------------------------------------------- storing


def write_cache(arrays: dict[str, torch.Tensor], meta: dict, directory: Path) -> Path:
    """Write atomically (see ``layerexit.tensor_dir``): a half-written cache is never left in place."""
    return write_tensor_dir(directory, arrays, meta, WEIGHTS, META)


def read_cache(directory: str | Path, expected: dict | None = None, field: str = "distill.cache_dir") -> TeacherCache:
    """Load a cache; a missing/half-written directory or a fingerprint for other model/tokenizer/data/settings is a
    ``ConfigError`` naming ``field``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / META).is_file() or not (directory / WEIGHTS).is_file():
        raise ConfigError(f"{field}: {directory} is not a complete teacher cache (no {META} or {WEIGHTS})",
                          "delete it and let the job rebuild it")
    meta = json.loads((directory / META).read_text())
    found = meta.get("fingerprint", {})
    if expected is not None:
        for key in ("format", "model", "tokenizer", "data", "k", "temperature", "layers", "precision", "positions"):
            if found.get(key) != expected.get(key):
                raise ConfigError(f"{field}: the teacher cache in {directory} was built for another {key} "
                                  f"({found.get(key)!r}, this run needs {expected.get(key)!r})",
                                  "remove the setting to build a matching cache, or point it at the right one")
    try:
        arrays = load_file(str(directory / WEIGHTS))
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file
        raise ConfigError(f"{field}: {directory / WEIGHTS} cannot be read ({err})", "delete it and rebuild") from None
    hidden = {int(name[len("hidden_l"):]): t for name, t in arrays.items() if name.startswith("hidden_l")}
    return TeacherCache(arrays["ids"], arrays["logp"], arrays["seq"], arrays["pos"], hidden, meta, directory)


def find_wider_cache(fp: dict) -> Path | None:
    """A complete default-location cache whose fingerprint equals ``fp`` except that it stores the hidden states of
    a superset of ``fp``'s layers (the teacher's top-k is the same, the extra hidden states are ignored)."""
    root = layerexit_home() / "teacher_cache"
    if not root.is_dir():
        return None
    for meta_path in sorted(root.glob(f"*/{META}")):
        try:
            found = json.loads(meta_path.read_text()).get("fingerprint", {})
        except (OSError, json.JSONDecodeError):
            continue
        same = all(found.get(k) == fp.get(k) for k in {*fp, *found} if k != "layers")
        if same and set(fp["layers"]) <= set(found.get("layers", [])) and (meta_path.parent / WEIGHTS).is_file():
            return meta_path.parent
    return None


def resolve_cache_precision(precision: str) -> str:
    """``distill.cache_precision``: ``auto`` -> ``autocast_bf16`` where the CPU has native bf16, else ``fp32`` (the
    teacher's forward is a batched prefill, compute-bound); the choice is logged (``layerexit.machine``)."""
    if precision != "auto":
        return precision
    from layerexit.machine import choose_dtype

    return "autocast_bf16" if choose_dtype("prefill", what="teacher cache").dtype == "bfloat16" else "fp32"


def build_teacher_cache(model_spec: str, examples: Sequence[TokenizedExample], *, k: int, temperature: float = 1.0,
                        layers: Sequence[int] = (), precision: str = "auto", directory: str | Path | None = None,
                        num_tasks: int = 2, model_and_tokenizer=None, console=None,
                        positions: str = "response", gpus_per_task: float = 0.0) -> TeacherCache:
    """The cache for (model, tokenizer, examples, k, temperature, layers, precision, positions): read when a complete
    matching one exists, else computed by ``num_tasks`` Ray tasks over shards of the examples and written atomically.

    ``directory`` given and holding a cache for something else: a ``ConfigError`` (never silently rebuilt over a
    cache the user named). ``model_and_tokenizer`` (tests) computes in this process instead of Ray tasks.
    ``gpus_per_task`` > 0: each Ray task asks for that many GPUs and runs the teacher there in bf16 (the fingerprint
    records ``gpu_bf16``): a 7B teacher's pass over a training set takes minutes on a GPU, hours on CPU cores.
    """
    from layerexit.losses.distill import check_distill_settings
    from layerexit.models.adapters import base_fingerprint
    from layerexit.models.loading import load_model_and_tokenizer

    # The fingerprint records what was used, never "auto".
    precision = "gpu_bf16" if gpus_per_task > 0 else resolve_cache_precision(precision)
    model, tok = model_and_tokenizer or load_model_and_tokenizer(model_spec)
    check_distill_settings(k, model.config.vocab_size, temperature)
    if positions not in ("response", "all"):
        raise ValueError(f"positions must be 'response' or 'all', not {positions!r}")
    fp = cache_fingerprint(base_fingerprint(model, tok), examples, k, temperature, layers, precision, positions)
    named = directory is not None
    target = Path(directory).expanduser() if named else default_cache_dir(fp)
    if (target / META).is_file():
        return read_cache(target, fp)  # mismatch -> ConfigError (named dir) ; default dirs are keyed by fp
    if not named:
        wider = find_wider_cache(fp)
        if wider is not None:  # same teacher on the same data, with more layers' hidden states: reuse it
            return read_cache(wider, {**fp, "layers": json.loads((wider / META).read_text())["fingerprint"]["layers"]})
    if named and target.exists() and any(target.iterdir()):
        raise ConfigError(f"distill.cache_dir: {target} exists but holds no complete teacher cache",
                          "delete it or choose an empty directory")
    t0 = time.time()
    examples = list(examples)
    if gpus_per_task <= 0 and (model_and_tokenizer is not None or num_tasks <= 1):
        arrays = teacher_for_examples(model, examples, 0, k, temperature, list(layers),
                                      precision == "autocast_bf16", pad_id=tok.pad_token_id, positions=positions)
    else:
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS", "local"))
        if gpus_per_task > 0 and ray.cluster_resources().get("GPU", 0) < gpus_per_task:
            raise ConfigError(f"distill.cache_gpus: {gpus_per_task} GPU(s) per cache task, but the Ray cluster has "
                              f"{ray.cluster_resources().get('GPU', 0):g}",
                              "run on GPU workers, or set distill.cache_gpus: 0 (CPU tasks)")
        del model
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_task)(_shard_task)
        size = -(-len(examples) // num_tasks)
        refs = [task.remote(model_spec, examples[i : i + size], i, k, temperature, list(layers), precision, 1,
                            positions, gpus_per_task > 0) for i in range(0, len(examples), size)]
        parts = ray.get(refs)
        arrays = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    build_s = time.time() - t0
    cache = TeacherCache(arrays["ids"], arrays["logp"], arrays["seq"], arrays["pos"],
                         {l: arrays[f"hidden_l{l}"] for l in layers})
    meta = {"fingerprint": fp, "positions": cache.num_positions, "examples": len(examples),
            "size_bytes": cache.size_bytes(), "build_s": round(build_s, 2), "model_spec": model_spec,
            "mean_topk_mass": float(cache.logp.exp().sum(-1).mean()) if cache.num_positions else 0.0}
    write_cache(arrays, meta, target)
    cache.meta, cache.path = meta, target
    if console is not None:
        console.print(f"teacher cache: {cache.num_positions} positions, k={k}, {meta['size_bytes'] / 2**20:.1f} MiB, "
                      f"built in {build_s:.0f} s -> {target}")
    return cache
