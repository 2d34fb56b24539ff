"""The training job's last stage (``draft.choose``): choose the draft the trained model ships with.

On the driver, after the workers finish: load the final checkpoint with its adapters, build the static draft
vocabulary from the training split's answers (when ``draft.vocab_size`` is set), measure lossless
self-speculative acceptance at each candidate exit on held-out prompts, pick (layer, draft length) by the
weight-bytes cost model (``tuning.draft_choice``), write ``draft_settings.json`` into the checkpoint's model
directory (so the registered model carries it) and log the figures and a plot to the run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from layerexit.data.datasets import IGNORE_INDEX, PreparedData
from layerexit.training.config import TrainConfig


def choose_and_ship_draft(cfg: TrainConfig, hf_dir: Path, data: PreparedData, run, console=None) -> dict:
    """Returns the summary logged to MLflow (``draft_choice.json``)."""
    import torch

    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.heads import build_draft_vocab, save_draft_vocab
    from layerexit.engine.reference import eos_ids
    from layerexit.models.draft_settings import VOCAB_FILE, write_draft_settings
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.tuning.draft_choice import choose_draft

    d = cfg.draft
    model, tok = load_model_and_tokenizer(str(hf_dir), dtype=torch.float32)
    vocab_path, vocab_size = None, None
    if d.vocab_size is not None:
        answers = ([t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE_INDEX] for ex in data.train)
        ids = build_draft_vocab(answers, d.vocab_size)
        # The answers may use fewer distinct tokens than asked for: the head is priced at what it holds.
        vocab_size = len(ids)
        vocab_path = save_draft_vocab(Path(hf_dir) / VOCAB_FILE, ids, tok)
    engine = EarlyExitEngine(model, eos_ids(model, tok), tok.pad_token_id)
    prompts = [list(p) for p in data.eval_prompts[: d.prompts]]
    layers = sorted(l for l in cfg.lite.exit_layers if l <= d.max_layer)
    best, rows = choose_draft(model, engine, prompts, layers, d.max_draft, d.max_new_tokens,
                              str(vocab_path) if vocab_path else None, vocab_size)
    write_draft_settings(hf_dir, best.settings(VOCAB_FILE if vocab_path else None))
    summary = {"chosen": {"layer": best.layer, "num_draft": best.num_draft, "cost_ratio": best.cost_ratio,
                          "predicted_speedup": best.predicted_speedup, "draft_vocab_size": vocab_size,
                          "draft_vocab_size_asked": d.vocab_size},
               "layers": [{"layer": r.layer, "best_num_draft": r.num_draft, "cost_ratio": r.cost_ratio,
                           "predicted_speedup": r.predicted_speedup, **r.stats.to_dict()} for r in rows]}
    metrics = {"draft/layer": best.layer, "draft/num_draft": best.num_draft, "draft/cost_ratio": best.cost_ratio,
               "draft/predicted_speedup": best.predicted_speedup,
               "draft/acceptance": best.stats.acceptance,
               "draft/tokens_per_verification": best.stats.tokens_per_verification}
    for i, a in enumerate(best.stats.per_position, start=1):
        metrics[f"draft/accept_pos{i}"] = a
    train_agree = training_agreement(model, data, layers, d.prompts)
    summary["train_agreement"] = train_agree
    for r in rows:
        metrics[f"draft/agreement_l{r.layer:02d}"] = r.stats.per_position[0] if r.stats.per_position else 0.0
        metrics[f"draft/train_agreement_l{r.layer:02d}"] = train_agree[r.layer]
        metrics[f"draft/predicted_speedup_l{r.layer:02d}"] = r.predicted_speedup
    run.log_metrics(metrics)
    run.log_dict(summary, "draft_choice.json")
    with tempfile.TemporaryDirectory() as tmp:
        run.log_artifact(plot_acceptance(rows, Path(tmp) / "draft_acceptance.png"), "draft")
    if console is not None:
        console.print(f"draft: layer {best.layer}, {best.num_draft} tokens, acceptance by position "
                      + " ".join(f"{a:.0%}" for a in best.stats.per_position)
                      + f", cost {best.cost_ratio:.2f} of a step, predicted {best.predicted_speedup:.2f}x")
    return summary


def training_agreement(model, data: PreparedData, layers: list[int], n: int) -> dict[int, float]:
    """Agreement of each exit with the final layer on the first ``n`` training sequences (teacher-forced on their
    answers): next to the held-out acceptance, it tells fitting from generalising."""
    from layerexit.engine.traces import layer_predictions

    L = model.config.num_hidden_layers
    same = {l: 0 for l in layers}
    total = 0
    for ex in data.train[:n]:
        top1, _, _ = layer_predictions(model, ex.input_ids, ex.prompt_len, [*layers, L])
        for i, l in enumerate(layers):
            same[l] += int((top1[i] == top1[-1]).sum())
        total += top1.shape[1]
    return {l: same[l] / total if total else 0.0 for l in layers}


def plot_acceptance(rows, path: Path) -> Path:
    """Conditional acceptance by draft position, one line per candidate exit layer."""
    lines = {f"layer {r.layer} (cost {r.cost_ratio:.2f}, {r.predicted_speedup:.2f}x at k={r.num_draft})":
             r.stats.per_position for r in rows}
    return plot_acceptance_lines(lines, path)


def plot_acceptance_lines(lines: dict[str, list[float]], path: Path) -> Path:
    """Conditional acceptance by draft position, one labelled line per entry (any draft kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, per_position in lines.items():
        ax.plot(list(range(1, len(per_position) + 1)), per_position, marker="o", label=label)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance (given the earlier drafts were accepted)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
