"""The evaluation report: the LITE paper's tables and figures for any model, exit configurations and prompt sets.

For every prompt set the final layer's responses are generated once (the *reference*), then each configured
method's. From them:

- Cost (Table 1 / Table 3 / Table 6): FLOPs per response as the engine counts them (every layer actually run,
  every LM-head check, K/V projections, catch-up work, plus the prompt's prefill), and the % cost improvement
  over the final layer's own responses generated with the same KV strategy. Also the improvement over the same
  tokens at full depth (length-independent), tokens/s, and generated tokens per method (Figure 7).
- Quality (Table 2 / Table 6): spaCy similarity to the reference response, MiniLM embedding cosine, token
  agreement, and optionally an LLM judge (Appendix A protocol, see ``judge.py``).
- Exit behaviour: share of tokens per exit layer (Figure 8); per-category breakdown (Figures 9-10).
- Alignment (Figures 5-6) of the model, optionally next to other models.

Outputs in ``output_dir``: ``report.md``, ``report.json`` (every number), ``responses.jsonl``, PNG figures; all
logged to one MLflow run with a nested run per method (``mlflow_report.py``).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from layerexit.data.prompts import Prompt, format_prompt
from layerexit.engine.decode import EarlyExitEngine, SequenceResult
from layerexit.engine.flops import FlopsModel
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.reference import eos_ids
from layerexit.errors import ConfigError
from layerexit.evaluation.config import EvalConfig, EvalMethod
from layerexit.evaluation.judge import UNAVAILABLE, JudgeSummary, LLMJudge, unavailable_summary
from layerexit.evaluation.prompt_sets import load_prompt_set
from layerexit.evaluation.similarity import embedding_similarities, spacy_similarities, token_agreement

NOT_RUN = "not run"
REFERENCE = "reference"


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class MethodRun:
    """One method's responses on one prompt set."""

    results: list[SequenceResult]
    wall_s: float
    reused_reference: bool = False


def response_flops(r: SequenceResult) -> int:
    """FLOPs of one response: generated tokens plus the prompt's prefill (0 for kv=none, where the first token's
    pass over the prompt is already in ``flops``)."""
    return int(r.flops + r.prefill_flops)


def response_flops_full(r: SequenceResult) -> int:
    return int(r.flops_full + r.prefill_flops)


def generate_all(engine: EarlyExitEngine, prompt_ids: Sequence[Sequence[int]], exit_config: ExitConfig,
                 sampling: SamplingParams, batch_size: int, desc: str, show_progress: bool) -> MethodRun:
    """Run the engine over every prompt (batches of similar length), with a progress bar over prompts."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i])) if batch_size > 1 else \
        list(range(len(prompt_ids)))
    results: list[SequenceResult | None] = [None] * len(prompt_ids)
    wall = 0.0
    with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            t0 = time.perf_counter()
            # A different (deterministic) seed per batch: the random baselines draw fresh exits for each prompt.
            seeded = replace(sampling, seed=(sampling.seed or 0) + start)
            outs = engine.generate([prompt_ids[i] for i in batch], exit_config, seeded)
            wall += time.perf_counter() - t0
            for i, r in zip(batch, outs, strict=True):
                results[i] = r
            bar.update(len(batch))
    return MethodRun([r for r in results if r is not None], wall)


# --------------------------------------------------------------------------------------------- aggregation
def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def summarize(rows: Sequence[dict[str, Any]], wall_s: float | None) -> dict[str, Any]:
    """Aggregate per-prompt rows of one method (all prompts, or one category) into the report's numbers."""
    n = len(rows)
    tokens = sum(r["tokens"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    flops_full = sum(r["flops_full"] for r in rows)
    ref_flops = sum(r["reference_flops"] for r in rows)
    layers: Counter[int] = Counter()
    for r in rows:
        layers.update(r["exit_layers"])
    total_layers = sum(layers.values())
    return {
        "prompts": n,
        "tokens_total": tokens,
        "tokens_mean": tokens / n if n else 0.0,
        "reference_tokens_mean": sum(r["reference_tokens"] for r in rows) / n if n else 0.0,
        "flops_total": flops,
        "flops_per_response": flops / n if n else 0.0,
        "reference_flops_per_response": ref_flops / n if n else 0.0,
        "cost_improvement_pct": 100.0 * (1.0 - flops / ref_flops) if ref_flops else 0.0,
        "token_cost_improvement_pct": 100.0 * (1.0 - flops / flops_full) if flops_full else 0.0,
        "flops_per_token": flops / tokens if tokens else 0.0,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s else None,
        "similarity_spacy": _mean([r["similarity_spacy"] for r in rows]),
        "similarity_embedding": _mean([r["similarity_embedding"] for r in rows]),
        "token_agreement": _mean([r["token_agreement"] for r in rows]),
        "prefix_agreement": _mean([r["prefix_agreement"] for r in rows]),
        "exact_match_rate": _mean([1.0 if r["exact_match"] else 0.0 for r in rows]),
        "exit_share": {int(k): v / total_layers for k, v in sorted(layers.items())} if total_layers else {},
        "mean_exit_layer": sum(k * v for k, v in layers.items()) / total_layers if total_layers else None,
        "judge_reference_score": _mean([r["judge_reference"] for r in rows]),
        "judge_candidate_score": _mean([r["judge_candidate"] for r in rows]),
    }


# ------------------------------------------------------------------------------------------------- report
@dataclass
class EvalReport:
    """What ``run_evaluation`` returns: the JSON-able numbers and where everything was written."""

    data: dict[str, Any]
    out_dir: Path
    markdown_path: Path
    json_path: Path
    figures: dict[str, Path] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    def summary(self, prompt_set: str | None = None) -> dict[str, dict[str, Any]]:
        """{method: summary} of one prompt set (default: the first)."""
        name = prompt_set or next(iter(self.data["prompt_sets"]))
        return self.data["prompt_sets"][name]["methods"]

    def headline_rows(self, prompt_set: str | None = None) -> list[dict[str, Any]]:
        """Rows of the headline table: cost improvement, similarity, tokens, judge per method."""
        name = prompt_set or next(iter(self.data["prompt_sets"]))
        block = self.data["prompt_sets"][name]
        rows = []
        for method, s in block["methods"].items():
            rows.append({
                "method": method,
                "cost_improvement_pct": s["cost_improvement_pct"],
                "similarity_spacy": s["similarity_spacy"],
                "similarity_embedding": s["similarity_embedding"],
                "token_agreement": s["token_agreement"],
                "tokens_mean": s["tokens_mean"],
                "reference_tokens_mean": s["reference_tokens_mean"],
                "judge": _judge_cell(s),
            })
        return rows


def _judge_cell(s: dict[str, Any]) -> str:
    status = s.get("judge_status")
    if status == "ok":
        return f"{s['judge_candidate_score']:.2f} vs {s['judge_reference_score']:.2f}"
    return status or NOT_RUN


def _check_methods(cfg: EvalConfig, num_layers: int) -> dict[str, ExitConfig]:
    """Every method's ExitConfig, validated against the model before anything is generated."""
    out = {}
    for m in cfg.methods:
        ec = m.exit_config(cfg.kv)
        try:
            ec.build_policy(num_layers)
        except ConfigError as err:
            raise ConfigError(f"method {m.name!r}: {err.problem}", err.fix) from None
        out[m.name] = ec
    return out


def _thresholds_of(ec: ExitConfig, num_layers: int) -> dict[int, float] | None:
    if ec.policy in ("confidence", "classifier", "random", "random-uniform", "sequential"):
        try:
            return ec.resolved_thresholds(num_layers)[0]
        except ConfigError:
            return None
    return None


def run_evaluation(cfg: EvalConfig, model_and_tokenizer=None, console=None) -> EvalReport:
    """Run the whole evaluation described by ``cfg``; write the report files (and log to MLflow if enabled)."""
    from layerexit.models.loading import load_model_and_tokenizer

    t_start = time.perf_counter()
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    # Inputs first: a bad prompt set fails before a model is loaded.
    prompt_sets: dict[str, list[Prompt]] = {ps.name: load_prompt_set(ps) for ps in cfg.prompt_sets}
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(cfg.model)
    model.eval()
    L = int(model.config.num_hidden_layers)
    exit_configs = _check_methods(cfg, L)
    engine = EarlyExitEngine(model, eos_ids(model, tokenizer), tokenizer.pad_token_id
                             if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed)
    fm = FlopsModel.from_config(model.config)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = LLMJudge(cfg.judge) if cfg.judge.enabled else None
    if console is not None:
        console.print(f"evaluating {cfg.model} ({L} layers): {len(cfg.methods)} methods on "
                      + ", ".join(f"{k} ({len(v)} prompts)" for k, v in prompt_sets.items())
                      + f", {cfg.max_new_tokens} tokens, kv={cfg.kv}, judge: {cfg.judge.url or 'off'}")

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    sets_out: dict[str, Any] = {}
    responses: list[dict[str, Any]] = []
    reference_runs: dict[str, tuple[list[list[int]], MethodRun]] = {}
    try:
        for set_name, prompts in prompt_sets.items():
            prompt_ids = [format_prompt(tokenizer, p.prompt) for p in prompts]
            texts = [p.prompt for p in prompts]
            ref_config = ExitConfig(policy="final", kv=cfg.kv)
            if not reference_runs:  # warm-up (first-call allocations) so the first timing is not inflated
                engine.generate(prompt_ids[:1], ref_config, SamplingParams(max_new_tokens=2))
            baselines: dict[str, MethodRun] = {
                cfg.kv: generate_all(engine, prompt_ids, ref_config, sampling, cfg.batch_size,
                                     f"{set_name}: final layer (reference)", cfg.show_progress)
            }
            reference = baselines[cfg.kv]
            reference_runs[set_name] = (prompt_ids, reference)
            ref_texts = [decode(r.token_ids) for r in reference.results]
            for p, t, r in zip(prompts, ref_texts, reference.results, strict=True):
                responses.append({"prompt_set": set_name, "method": REFERENCE, "id": p.extra.get("id"),
                                  "category": p.category, "prompt": p.prompt, "response": t,
                                  "tokens": len(r.token_ids)})
            methods_out: dict[str, Any] = {}
            for method in cfg.methods:
                ec = exit_configs[method.name]
                if ec.kv not in baselines:  # the cost baseline must use the method's KV strategy
                    baselines[ec.kv] = generate_all(engine, prompt_ids, ExitConfig(policy="final", kv=ec.kv),
                                                    sampling, cfg.batch_size,
                                                    f"{set_name}: final layer (kv={ec.kv}, cost baseline)",
                                                    cfg.show_progress)
                baseline = baselines[ec.kv]
                if cfg.reuse_reference and ec.policy == "final" and ec.kv == cfg.kv:
                    run = MethodRun(reference.results, reference.wall_s, reused_reference=True)
                else:
                    run = generate_all(engine, prompt_ids, ec, sampling, cfg.batch_size,
                                       f"{set_name}: {method.name}", cfg.show_progress)
                methods_out[method.name] = _score_method(
                    cfg, method, ec, L, prompts, texts, reference, ref_texts, baseline, run, decode, judge,
                    set_name, responses,
                )
            judge_statuses = {m["judge_status"] for m in methods_out.values()} - {REFERENCE}
            sets_out[set_name] = {
                "num_prompts": len(prompts),
                "reference_wall_s": reference.wall_s,
                "judge_status": (NOT_RUN if judge is None else UNAVAILABLE if UNAVAILABLE in judge_statuses else "ok"),
                "methods": methods_out,
            }
    finally:
        if judge is not None:
            judge.close()

    alignment = _alignment(cfg, model, tokenizer, prompt_sets, reference_runs) if cfg.alignment.enabled else {}

    data: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"spec": cfg.model, "num_layers": L, "hidden_size": model.config.hidden_size,
                  "vocab_size": model.config.vocab_size, "flops_per_layer_token": fm.layer_linear,
                  "flops_per_head": fm.head(1), "head_in_layers": fm.head_in_layers()},
        "methods": {m.name: {"policy": exit_configs[m.name].policy, "kv": exit_configs[m.name].kv,
                             "thresholds": _thresholds_of(exit_configs[m.name], L),
                             "layer": exit_configs[m.name].layer} for m in cfg.methods},
        "prompt_sets": sets_out,
        "alignment": {label: rep.to_dict() for label, rep in alignment.items()},
        "judge": {"enabled": judge is not None, "url": cfg.judge.url, "model": cfg.judge.model,
                  "requests_sent": judge.requests_sent if judge else 0,
                  "down_reason": judge.down_reason if judge else None},
    }
    figures = write_figures(data, alignment, out_dir)
    data["figures"] = {k: p.name for k, p in figures.items()}
    data["elapsed_s"] = time.perf_counter() - t_start
    md_path = out_dir / "report.md"
    md_path.write_text(render_markdown(data))
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(data, indent=1, default=_json_default))
    with (out_dir / "responses.jsonl").open("w", encoding="utf-8") as fh:
        for row in responses:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    report = EvalReport(data, out_dir, md_path, json_path, figures)
    if cfg.mlflow.enabled:
        from layerexit.evaluation.mlflow_report import log_evaluation

        report.mlflow_run_id = log_evaluation(
            data, out_dir, cfg.mlflow.experiment,
            cfg.mlflow.run_name or f"eval-{Path(cfg.model).name or cfg.model}", cfg.mlflow.tracking_uri,
        )
    return report


def _json_default(obj: Any):
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _score_method(cfg: EvalConfig, method: EvalMethod, ec: ExitConfig, L: int, prompts: Sequence[Prompt],
                  texts: Sequence[str], reference: MethodRun, ref_texts: Sequence[str], baseline: MethodRun,
                  run: MethodRun, decode, judge: LLMJudge | None, set_name: str,
                  responses: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-prompt rows and the summary (overall and per category) of one method on one prompt set."""
    cand_texts = [decode(r.token_ids) for r in run.results]
    n = len(prompts)
    sim_spacy = spacy_similarities(ref_texts, cand_texts) if cfg.similarity.spacy else [None] * n
    sim_emb = embedding_similarities(ref_texts, cand_texts) if cfg.similarity.embedding else [None] * n
    if run.reused_reference:
        judge_summary = None
        judge_status = REFERENCE
    elif judge is None:
        judge_summary = None
        judge_status = NOT_RUN
    else:
        judge_summary = judge.judge_many(list(zip(texts, ref_texts, cand_texts, strict=True)),
                                         desc=f"{set_name}: judge {method.name}", show_progress=cfg.show_progress)
        judge_status = judge_summary.status
    rows = []
    for i, (p, r, ref) in enumerate(zip(prompts, run.results, reference.results, strict=True)):
        agree = token_agreement(ref.token_ids, r.token_ids)
        j = judge_summary.judgements[i] if judge_summary is not None and judge_status == "ok" else None
        rows.append({
            "index": i,
            "id": p.extra.get("id"),
            "category": p.category or "uncategorized",
            "tokens": len(r.token_ids),
            "reference_tokens": len(ref.token_ids),
            "flops": response_flops(r),
            "flops_full": response_flops_full(r),
            "reference_flops": response_flops(baseline.results[i]),
            "finish_reason": r.finish_reason,
            "exit_layers": list(r.exit_layers),
            "similarity_spacy": sim_spacy[i],
            "similarity_embedding": sim_emb[i],
            "token_agreement": agree.agreement,
            "prefix_agreement": agree.prefix,
            "exact_match": agree.exact,
            "judge_reference": j.reference if j else None,
            "judge_candidate": j.candidate if j else None,
            "judge_orders_parsed": j.orders_parsed if j else None,
        })
        if not run.reused_reference:
            responses.append({"prompt_set": set_name, "method": method.name, "id": p.extra.get("id"),
                              "category": p.category, "prompt": p.prompt, "response": cand_texts[i],
                              "tokens": len(r.token_ids), "exit_layers": list(r.exit_layers)})
    summary = summarize(rows, run.wall_s)
    summary.update(_judge_fields(judge_summary, judge_status, n))
    summary["policy"] = ec.policy
    summary["kv"] = ec.kv
    summary["reused_reference"] = run.reused_reference
    categories = sorted({r["category"] for r in rows})
    if categories != ["uncategorized"]:
        summary["categories"] = {c: summarize([r for r in rows if r["category"] == c], None) for c in categories}
    summary["per_prompt"] = rows
    return summary


def _judge_fields(js: JudgeSummary | None, status: str, n: int) -> dict[str, Any]:
    if js is None:
        js = unavailable_summary(n, status)
    ok = status == "ok"
    return {
        "judge_status": status,
        "judge_reason": js.reason if status not in (REFERENCE, NOT_RUN) else None,
        "judge_pairs": js.pairs if status not in (REFERENCE, NOT_RUN) else 0,
        "judge_scored_pairs": js.scored_pairs,
        "judge_parse_failures": js.parse_failures,
        "judge_request_failures": js.request_failures,
        "judge_reference_score": js.reference_score if ok else None,
        "judge_candidate_score": js.candidate_score if ok else None,
    }


def _alignment(cfg: EvalConfig, model, tokenizer, prompt_sets, reference_runs) -> dict[str, Any]:
    """Figures 5-6 for the evaluated model (on the first prompt set's reference responses) and any others."""
    from layerexit.engine.reference import hf_greedy_generate_batched
    from layerexit.evaluation.alignment import alignment_from_generations
    from layerexit.models.loading import load_model_and_tokenizer

    first = next(iter(reference_runs))
    prompt_ids, reference = reference_runs[first]
    label = cfg.alignment.label or cfg.model
    out = {label: alignment_from_generations(model, prompt_ids, [r.token_ids for r in reference.results],
                                             show_progress=cfg.show_progress)}
    texts = [p.prompt for p in prompt_sets[first]]
    for other_label, spec in cfg.alignment.compare_models.items():
        other, other_tok = load_model_and_tokenizer(spec)
        ids = [format_prompt(other_tok, t) for t in texts]
        pad = other_tok.pad_token_id if other_tok.pad_token_id is not None else other_tok.eos_token_id
        gens = hf_greedy_generate_batched(other, ids, cfg.max_new_tokens, pad, batch_size=max(1, cfg.batch_size),
                                          eos=eos_ids(other, other_tok), show_progress=cfg.show_progress,
                                          desc=f"alignment: {other_label}")
        out[other_label] = alignment_from_generations(other, ids, gens, show_progress=cfg.show_progress)
    return out


# ------------------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(data: dict[str, Any], alignment: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Every PNG of the report; returns {figure key: path}."""
    plt = _plt()
    figs: dict[str, Path] = {}
    sets = data["prompt_sets"]
    methods = list(data["methods"])

    # Fig. 1 / Fig. 12 / Table 6 as a chart: cost improvement and similarity per method and prompt set.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(sets))
    for i, (set_name, block) in enumerate(sets.items()):
        xs = [j + i * width for j in range(len(methods))]
        ax1.bar(xs, [block["methods"][m]["cost_improvement_pct"] for m in methods], width, label=set_name)
        ax2.bar(xs, [block["methods"][m]["similarity_spacy"] or 0.0 for m in methods], width, label=set_name)
    for ax, title, ylabel in ((ax1, "Cost improvement over the final layer (Table 1)", "% fewer FLOPs"),
                              (ax2, "Similarity to the final layer's response (Table 2)", "spaCy similarity")):
        ax.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(methods))])
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    figs["cost_quality"] = _save(fig, out_dir / "cost_quality.png", plt)

    # Fig. 7: average generated tokens, reference vs each method.
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) + 3), 4))
    labels = ["final (reference)", *methods]
    for i, (set_name, block) in enumerate(sets.items()):
        first = next(iter(block["methods"].values()))
        vals = [first["reference_tokens_mean"], *[block["methods"][m]["tokens_mean"] for m in methods]]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=set_name)
    ax.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("generated tokens per response")
    ax.set_title("Response length per method (Fig. 7)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["tokens"] = _save(fig, out_dir / "tokens.png", plt)

    # Fig. 8: share of tokens per exit layer, first prompt set, every method.
    first_set = next(iter(sets.values()))
    layers = sorted({int(k) for m in methods for k in first_set["methods"][m]["exit_share"]})
    fig, ax = plt.subplots(figsize=(min(16, max(7, 0.2 * len(layers) * len(methods) + 4)), 4))
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        share = first_set["methods"][m]["exit_share"]
        ax.bar([j + i * w for j in range(len(layers))], [100 * share.get(l, share.get(str(l), 0.0)) for l in layers],
               w, label=m)
    ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(layers))])
    ax.set_xticklabels([str(l) for l in layers])
    ax.set_xlabel("exit layer")
    ax.set_ylabel("% of generated tokens")
    ax.set_title(f"Tokens per exit layer (Fig. 8), {next(iter(sets))}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["exit_share"] = _save(fig, out_dir / "exit_share.png", plt)

    # Figs. 9-10: per category, cost improvement and similarity.
    for set_name, block in sets.items():
        cats_by_method = {m: block["methods"][m].get("categories") for m in methods}
        if not any(cats_by_method.values()):
            continue
        cats = sorted({c for v in cats_by_method.values() if v for c in v})
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(cats) + 6), 4.5))
        for i, m in enumerate(methods):
            cm = cats_by_method[m] or {}
            xs = [j + i * w for j in range(len(cats))]
            ax1.bar(xs, [cm.get(c, {}).get("cost_improvement_pct", 0.0) for c in cats], w, label=m)
            ax2.bar(xs, [cm.get(c, {}).get("similarity_spacy") or 0.0 for c in cats], w, label=m)
        for ax, title, ylabel in ((ax1, f"Cost improvement per category, {set_name} (Figs. 9-10)", "% fewer FLOPs"),
                                  (ax2, f"Similarity per category, {set_name}", "spaCy similarity")):
            ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(cats))])
            ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(ylabel)
            ax.axhline(0, color="black", lw=0.6)
            ax.grid(axis="y", alpha=0.3)
        ax1.legend(fontsize=7)
        ax2.set_ylim(0, 1.05)
        fig.tight_layout()
        figs[f"categories_{set_name}"] = _save(fig, out_dir / f"categories_{set_name}.png", plt)

    if alignment:
        from layerexit.evaluation.alignment import plot_alignment

        figs["alignment"] = plot_alignment(alignment, out_dir / "alignment.png")
    return figs


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ markdown
def _f(value: Any, fmt: str = ".3f", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, str):
        return value
    return format(value, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _judge_cells(s: dict[str, Any]) -> tuple[str, str]:
    status = s["judge_status"]
    if status == "ok":
        return _f(s["judge_candidate_score"], ".2f"), _f(s["judge_reference_score"], ".2f")
    return status, status


def render_markdown(data: dict[str, Any]) -> str:
    """The report as Markdown: paper-style tables, then figures."""
    cfg = data["config"]
    sets = data["prompt_sets"]
    methods = list(data["methods"])
    out = [
        f"# Early-exit evaluation: {cfg['model']}",
        "",
        f"- model: `{cfg['model']}`, {data['model']['num_layers']} layers, hidden {data['model']['hidden_size']}, "
        f"vocab {data['model']['vocab_size']} (one LM-head evaluation = {data['model']['head_in_layers']:.2f} layers)",
        f"- prompt sets: " + ", ".join(f"{k} ({v['num_prompts']})" for k, v in sets.items()),
        f"- max new tokens {cfg['max_new_tokens']}, greedy, batch size {cfg['batch_size']}, reference KV strategy "
        f"`{cfg['kv']}`; created {data['created']}",
        "- FLOPs count what the engine computed (layers run, every LM-head check, K/V projections, catch-up, "
        "prefill). Cost improvement is against the final layer's own responses with the same KV strategy; "
        "'same-token' improvement is against the method's tokens at full depth.",
        "",
        "## Methods",
        "",
        _table(["method", "policy", "kv", "thresholds / layer"],
               [[m, d["policy"], d["kv"],
                 ", ".join(f"{k}:{v:g}" for k, v in (d["thresholds"] or {}).items()) or
                 (str(d["layer"]) if d["layer"] else "-")] for m, d in data["methods"].items()]),
        "",
        "## Table 1: inference cost improvement over the final layer (% FLOPs)",
        "",
        _table(["prompt set", *methods],
               [[s, *[_f(b["methods"][m]["cost_improvement_pct"], ".2f") for m in methods]] for s, b in sets.items()]),
        "",
        "## Table 2: semantic similarity to the final layer's responses (spaCy en_core_web_sm)",
        "",
        _table(["prompt set", *methods],
               [[s, *[_f(b["methods"][m]["similarity_spacy"], ".4f") for m in methods]] for s, b in sets.items()]),
        "",
    ]
    for set_name, block in sets.items():
        out += [
            f"## Table 6: methods and baselines on `{set_name}` ({block['num_prompts']} prompts)",
            "",
            _table(
                ["method", "judge (method)", "judge (final)", "spaCy sim", "MiniLM cos", "token agr.",
                 "GFLOPs/resp", "final GFLOPs/resp", "cost impr. %", "same-token impr. %", "tokens", "final tokens",
                 "tokens/s", "mean exit layer"],
                [[m, *_judge_cells(s), _f(s["similarity_spacy"], ".4f"), _f(s["similarity_embedding"], ".4f"),
                  _f(s["token_agreement"], ".3f"), _f(s["flops_per_response"] / 1e9, ".2f"),
                  _f(s["reference_flops_per_response"] / 1e9, ".2f"), _f(s["cost_improvement_pct"], ".2f"),
                  _f(s["token_cost_improvement_pct"], ".2f"), _f(s["tokens_mean"], ".1f"),
                  _f(s["reference_tokens_mean"], ".1f"), _f(s["tokens_per_s"], ".1f"), _f(s["mean_exit_layer"], ".1f")]
                 for m, s in block["methods"].items()],
            ),
            "",
        ]
        judge_rows = [[m, s["judge_status"], str(s["judge_pairs"]), str(s["judge_scored_pairs"]),
                       str(s["judge_parse_failures"]), str(s["judge_request_failures"]), s["judge_reason"] or ""]
                      for m, s in block["methods"].items() if s["judge_status"] not in (REFERENCE,)]
        if judge_rows and block["judge_status"] != NOT_RUN:
            out += [f"### LLM judge on `{set_name}` (Appendix A: both orders, averaged)", "",
                    _table(["method", "status", "pairs", "scored", "parse failures", "request failures", "reason"],
                           judge_rows), ""]
        layers = sorted({int(k) for s in block["methods"].values() for k in s["exit_share"]})
        out += [
            f"### Figure 8: % of tokens per exit layer on `{set_name}`",
            "",
            _table(["method", *[f"L{l}" for l in layers]],
                   [[m, *[_f(100 * s["exit_share"].get(l, s["exit_share"].get(str(l), 0.0)), ".1f") for l in layers]]
                    for m, s in block["methods"].items()]),
            "",
        ]
        cat_methods = [m for m, s in block["methods"].items() if s.get("categories")]
        if cat_methods:
            cats = sorted({c for m in cat_methods for c in block["methods"][m]["categories"]})
            out += [f"### Figures 9-10: per category on `{set_name}` (cost improvement % / spaCy similarity)", "",
                    _table(["category", "prompts", *cat_methods],
                           [[c, str(next(block["methods"][m]["categories"][c]["prompts"] for m in cat_methods
                                         if c in block["methods"][m]["categories"])),
                             *[(f"{_f(cs['cost_improvement_pct'], '.1f')} / {_f(cs['similarity_spacy'], '.3f')}"
                                if (cs := block["methods"][m]["categories"].get(c)) else "-") for m in cat_methods]]
                            for c in cats]), ""]
    if data.get("alignment"):
        labels = list(data["alignment"])
        by_layer = {lab: {r["layer"]: r for r in data["alignment"][lab]["rows"]} for lab in labels}
        layers = sorted({layer for rows in by_layer.values() for layer in rows})

        def cell(lab: str, layer: int, key: str, scale: float, fmt: str) -> str:
            row = by_layer[lab].get(layer)
            return _f(scale * row[key], fmt) if row else "-"

        out += ["## Figures 5-6: per-layer alignment with the final layer", "",
                _table(["layer", *[f"{lab} aligned %" for lab in labels], *[f"{lab} mean conf" for lab in labels]],
                       [[str(layer), *[cell(lab, layer, "alignment", 100.0, ".1f") for lab in labels],
                         *[cell(lab, layer, "mean_confidence", 1.0, ".3f") for lab in labels]] for layer in layers]),
                ""]
    out += ["## Figures", ""]
    for key, name in data.get("figures", {}).items():
        out += [f"### {key}", "", f"![{key}]({name})", ""]
    return "\n".join(out)
