"""Throughput and FLOPs of exit configurations against transformers' cached ``generate``, in one process.

Every configuration decodes the same prompts with the same batch size; ratios are taken against the
baseline measured in the same run, because shared machines are noisy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from layerexit.engine.decode import EarlyExitEngine, SequenceResult
from layerexit.engine.flops import FlopsModel
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.reference import hf_greedy_generate

BASELINE = "hf-generate"
FLOOR = "floor (weights only)"
PROMPT_LOOKUP = "hf-prompt-lookup"
PROMPT_LOOKUP_TOKENS = 10  # transformers' documented setting, and what the issue measured
COMPILED = " +compile"  # suffix of the rows decoded by the compiled engine (``compile=True``)


def weights_floor_tokens_per_s(model, repeats: int = 30) -> float:
    """Tokens/s if a decode step were nothing but one matrix-vector product per weight matrix (every decoder
    projection and the LM head, for one token): the memory-bound ceiling at batch 1 on this machine."""
    import torch
    from torch import nn

    mats = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    dtype = mats[0].dtype
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype, device=w.device) for w in mats}
    with torch.inference_mode():
        for w in mats:  # warm-up
            torch.nn.functional.linear(xs[w.shape[1]], w)
        sync = torch.cuda.synchronize if mats[0].is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for w in mats:
                torch.nn.functional.linear(xs[w.shape[1]], w)
        sync()
        return repeats / (time.perf_counter() - t0)


@dataclass
class BenchRow:
    name: str
    tokens: int
    seconds: float
    tokens_per_s: float
    flops_per_token: float
    speedup: float = 1.0  # tokens/s relative to transformers generate
    flops_ratio: float = 1.0  # FLOPs/token relative to transformers generate
    agreement: float | None = None  # share of positions equal to `final`'s tokens
    identical: float | None = None  # share of sequences identical to `final`'s
    mean_exit_layer: float | None = None
    similarity: float | None = None  # mean spaCy similarity of decoded text to `final`'s (set by the caller)
    compile_seconds: float | None = None  # compiled rows: wall time of the first call of each compiled graph

    def to_dict(self) -> dict:
        return asdict(self)


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[float, float]:
    """Position-wise agreement over the longer of each pair, and the share of identical sequences."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
    identical = sum(1 for x, y in zip(a, b, strict=True) if list(x) == list(y)) / max(1, len(a))
    return (same / total if total else 1.0), identical


def _batches(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_bench(model, prompt_ids: Sequence[Sequence[int]], configs: dict[str, ExitConfig], eos: set[int],
              pad_id: int, max_new_tokens: int = 64, batch_size: int = 1, show_progress: bool = True,
              floor: bool = True, compile: bool = False
              ) -> tuple[list[BenchRow], dict[str, list[SequenceResult]]]:
    """Benchmark transformers generate (greedy, KV cache) and each named configuration on the same prompts.
    Adds the weights-only floor row and, when a configuration drafts from n-grams, transformers' own
    prompt-lookup decoding (``hf-prompt-lookup``) on the same prompts. With ``compile``, every configuration
    also runs on a compiled engine (rows ``NAME +compile``), which decodes the first batch once before timing."""
    fm = FlopsModel.from_config(model.config)
    engine = EarlyExitEngine(model, eos, pad_id)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    batches = _batches(list(prompt_ids), batch_size)
    # Warm up both paths (allocator, kernels) so the first timed configuration is not penalised.
    hf_greedy_generate(model, batches[0][:1], 4, pad_id, eos)
    engine.generate(batches[0][:1], ExitConfig(), SamplingParams(max_new_tokens=4))
    runs = {name: (engine, cfg) for name, cfg in configs.items()}
    compile_seconds: dict[str, float] = {}
    if compile:
        compiled = EarlyExitEngine(model, eos, pad_id, compile=True)
        for name, cfg in configs.items():
            # Graphs compile on first use, one per segment shape: decoding the first batch compiles the common
            # ones before timing; a shape met only later compiles inside the timed run (and in compile_seconds).
            before = compiled.compiled.compile_seconds
            compiled.generate(batches[0], cfg, sampling)
            compile_seconds[name + COMPILED] = compiled.compiled.compile_seconds - before
            runs[name + COMPILED] = (compiled, cfg)

    # Interleaved: every batch runs through every configuration before the next batch, so load that comes and
    # goes on a shared machine hits all of them alike (sequential blocks made ratios swing by 2-3x there).
    lookup = any(cfg.policy == "self-speculative" and "ngram" in cfg.draft for cfg in configs.values())
    seconds = {name: 0.0 for name in [BASELINE, *([PROMPT_LOOKUP] if lookup else []), *runs]}
    hf_out: list[list[int]] = []
    pl_out: list[list[int]] = []
    outputs: dict[str, list[SequenceResult]] = {name: [] for name in runs}
    floors: list[float] = []
    for i, batch in enumerate(tqdm(batches, desc="bench", disable=not show_progress)):
        t0 = time.perf_counter()
        hf_out.extend(hf_greedy_generate(model, batch, max_new_tokens, pad_id, eos))
        seconds[BASELINE] += time.perf_counter() - t0
        if lookup:
            t0 = time.perf_counter()
            pl_out.extend(hf_greedy_generate(model, batch, max_new_tokens, pad_id, eos,
                                             prompt_lookup=PROMPT_LOOKUP_TOKENS))
            seconds[PROMPT_LOOKUP] += time.perf_counter() - t0
        for name, (eng, cfg) in runs.items():
            before = eng.compiled.compile_seconds if eng.compiled is not None else 0.0
            t0 = time.perf_counter()
            outputs[name].extend(eng.generate(batch, cfg, sampling))
            seconds[name] += time.perf_counter() - t0
            if eng.compiled is not None:
                compile_seconds[name] += eng.compiled.compile_seconds - before
        if floor and (i % max(1, len(batches) // 4) == 0 or i == len(batches) - 1):
            floors.append(weights_floor_tokens_per_s(model, 10))
    rows: list[BenchRow] = []
    hf_tokens = sum(len(o) for o in hf_out)
    # Same convention as the engine: the prompt's prefill is not a generated token's cost; token i > 0 is one
    # full-depth step of token i-1 at context len(prompt) + i, plus the LM head.
    hf_flops = sum(
        (fm.num_layers * fm.layer(1, len(p) + i) if i else 0) + fm.head(1)
        for p, o in zip(prompt_ids, hf_out) for i in range(len(o))
    )
    base = BenchRow(BASELINE, hf_tokens, seconds[BASELINE], hf_tokens / seconds[BASELINE],
                    hf_flops / max(1, hf_tokens))
    rows.append(base)
    if floor:
        tps = sum(floors) / len(floors)
        floor_flops = fm.num_layers * fm.layer_linear + fm.head(1)
        rows.append(BenchRow(FLOOR, 0, 0.0, tps, floor_flops, speedup=tps / base.tokens_per_s,
                             flops_ratio=floor_flops / base.flops_per_token))
    extra_outputs = {}
    if lookup:
        n = sum(len(o) for o in pl_out)
        row = BenchRow(PROMPT_LOOKUP, n, seconds[PROMPT_LOOKUP], n / seconds[PROMPT_LOOKUP], base.flops_per_token)
        row.speedup = row.tokens_per_s / base.tokens_per_s
        rows.append(row)
        extra_outputs = {PROMPT_LOOKUP: pl_out}
    for name, results in outputs.items():
        tokens = sum(len(r.token_ids) for r in results)
        flops = sum(r.flops for r in results)
        layers = [l for r in results for l in r.exit_layers]
        row = BenchRow(name, tokens, seconds[name], tokens / seconds[name], flops / max(1, tokens),
                       mean_exit_layer=sum(layers) / max(1, len(layers)), compile_seconds=compile_seconds.get(name))
        row.speedup = row.tokens_per_s / base.tokens_per_s
        row.flops_ratio = row.flops_per_token / base.flops_per_token
        rows.append(row)
    reference = [r.token_ids for r in outputs["final"]] if "final" in outputs else hf_out
    for row in rows:
        if row.name == FLOOR:
            continue
        seqs = hf_out if row.name == BASELINE else extra_outputs[row.name] if row.name in extra_outputs else \
            [r.token_ids for r in outputs[row.name]]
        row.agreement, row.identical = token_agreement(seqs, reference)
    return rows, outputs


def _pct(value: float | None, digits: int) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}%"


def bench_markdown(rows: list[BenchRow]) -> str:
    """The table docs/benchmarks.md records."""
    with_sim = any(r.similarity is not None for r in rows)
    with_compile = any(r.compile_seconds is not None for r in rows)
    lines = ["| configuration | tokens | tokens/s | x HF tok/s | FLOPs/token (M) | x HF FLOPs | agreement w/ final | "
             "identical seqs | mean exit layer |" + (" spaCy sim w/ final |" if with_sim else "")
             + (" compile (s) |" if with_compile else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_sim else "") + ("---|" if with_compile else "")]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.tokens} | {r.tokens_per_s:.1f} | {r.speedup:.2f} | {r.flops_per_token / 1e6:.1f} | "
            f"{r.flops_ratio:.2f} | {_pct(r.agreement, 1)} | {_pct(r.identical, 0)} | "
            f"{'' if r.mean_exit_layer is None else f'{r.mean_exit_layer:.1f}'} |"
            + (f" {'' if r.similarity is None else f'{r.similarity:.3f}'} |" if with_sim else "")
            + (f" {'' if r.compile_seconds is None else f'{r.compile_seconds:.1f}'} |" if with_compile else "")
        )
    return "\n".join(lines)
