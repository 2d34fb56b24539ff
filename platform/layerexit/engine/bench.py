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
              ) -> tuple[list[BenchRow], dict[str, list[SequenceResult]]]:
    """Benchmark transformers generate (greedy, KV cache) and each named configuration on the same prompts."""
    fm = FlopsModel.from_config(model.config)
    engine = EarlyExitEngine(model, eos, pad_id)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    batches = _batches(list(prompt_ids), batch_size)
    # Warm up both paths (allocator, kernels) so the first timed configuration is not penalised.
    hf_greedy_generate(model, batches[0][:1], 4, pad_id, eos)
    engine.generate(batches[0][:1], ExitConfig(), SamplingParams(max_new_tokens=4))

    rows: list[BenchRow] = []
    t0 = time.perf_counter()
    hf_out = []
    for batch in tqdm(batches, desc=BASELINE, disable=not show_progress):
        hf_out.extend(hf_greedy_generate(model, batch, max_new_tokens, pad_id, eos))
    hf_seconds = time.perf_counter() - t0
    hf_tokens = sum(len(o) for o in hf_out)
    # Same convention as the engine: the prompt's prefill is not a generated token's cost; token i > 0 is one
    # full-depth step of token i-1 at context len(prompt) + i, plus the LM head.
    hf_flops = sum(
        (fm.num_layers * fm.layer(1, len(p) + i) if i else 0) + fm.head(1)
        for p, o in zip(prompt_ids, hf_out) for i in range(len(o))
    )
    base = BenchRow(BASELINE, hf_tokens, hf_seconds, hf_tokens / hf_seconds, hf_flops / max(1, hf_tokens))
    rows.append(base)
    outputs: dict[str, list[SequenceResult]] = {}
    for name, cfg in configs.items():
        results: list[SequenceResult] = []
        t0 = time.perf_counter()
        for batch in tqdm(batches, desc=name, disable=not show_progress):
            results.extend(engine.generate(batch, cfg, sampling))
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in results)
        flops = sum(r.flops for r in results)
        layers = [l for r in results for l in r.exit_layers]
        row = BenchRow(name, tokens, seconds, tokens / seconds, flops / max(1, tokens),
                       mean_exit_layer=sum(layers) / max(1, len(layers)))
        row.speedup = row.tokens_per_s / base.tokens_per_s
        row.flops_ratio = row.flops_per_token / base.flops_per_token
        outputs[name] = results
        rows.append(row)
    reference = [r.token_ids for r in outputs["final"]] if "final" in outputs else hf_out
    for row in rows:
        seqs = hf_out if row.name == BASELINE else [r.token_ids for r in outputs[row.name]]
        row.agreement, row.identical = token_agreement(seqs, reference)
    return rows, outputs


def bench_markdown(rows: list[BenchRow]) -> str:
    """The table docs/benchmarks.md records."""
    with_sim = any(r.similarity is not None for r in rows)
    lines = ["| configuration | tokens | tokens/s | x HF tok/s | FLOPs/token (M) | x HF FLOPs | agreement w/ final | "
             "identical seqs | mean exit layer |" + (" spaCy sim w/ final |" if with_sim else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_sim else "")]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.tokens} | {r.tokens_per_s:.1f} | {r.speedup:.2f} | {r.flops_per_token / 1e6:.1f} | "
            f"{r.flops_ratio:.2f} | {100 * (r.agreement or 0):.1f}% | {100 * (r.identical or 0):.0f}% | "
            f"{'' if r.mean_exit_layer is None else f'{r.mean_exit_layer:.1f}'} |"
            + (f" {'' if r.similarity is None else f'{r.similarity:.3f}'} |" if with_sim else "")
        )
    return "\n".join(lines)
