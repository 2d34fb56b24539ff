"""``recipe: eagle3``: an EAGLE-3 feature draft trained on the frozen model's own features and distribution.

The base model is frozen and never handed to DeepSpeed: only the draft (:class:`layerexit.models.eagle3.Eagle3Draft`,
one decoder layer + a pruned head over the draft vocabulary) is trained. Its inputs come from the teacher cache
built over EVERY position of every training sequence (``positions="all"``): the target's hidden states at the aux
layers (bf16) and its top-k next-token distribution; no target layer runs while training. Each batch is unrolled
``eagle3.ttt_steps`` times on the draft's own features (training-time test, ``Eagle3Draft.unrolled``) and every
step is scored by soft cross-entropy against the teacher's top-k restricted to the draft vocabulary
(``layerexit.losses.eagle3``), steps weighted ``step_decay ** j``.

Held-out acceptance is measured teacher-forced on the target's own greedy answers to held-out prompts: at every
start the draft chains k steps; the accepted length is the number of leading steps whose argmax equals the
target's greedy token, +1 for the bonus token, which is exactly what greedy speculative decoding with this draft
accepts (the accepted steps read the same tokens and features as at decode time).

Driver side: extra training text (``data.magpie_prompts``, ``data.text_tokens``), the draft vocabulary, and the
shipping step (``eagle3/`` + ``draft_settings.json`` with the draft length chosen from measured acceptance).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from layerexit.data.datasets import IGNORE_INDEX, PreparedData, TokenizedExample
from layerexit.losses.eagle3 import step_weights, teacher_in_draft_vocab, ttt_loss
from layerexit.models.eagle3 import Eagle3Draft, Eagle3Spec
from layerexit.models.exits import collect_hidden_states, decoder_parts

EAGLE3_DIR = "eagle3"

# ============================================================================================ the draft


def new_draft(model: nn.Module, aux_layers: Sequence[int] | None, vocab_ids: Sequence[int],
              target: dict | None = None, seed: int = 0) -> Eagle3Draft:
    """A fresh draft for ``model``: random layer and ``fc``; ``lm_head`` = the target's head rows of the draft
    vocabulary and ``norm`` = the target's final norm (the draft starts in the target's output space)."""
    parts = decoder_parts(model)
    spec = Eagle3Spec.for_target(model.config, tuple(aux_layers) if aux_layers else None, len(vocab_ids), target)
    torch.manual_seed(seed)
    draft = Eagle3Draft(spec, model.get_input_embeddings())
    draft.set_vocab(list(vocab_ids))
    with torch.no_grad():
        draft.lm_head.weight.copy_(parts.head.weight[draft.draft_to_target].float())
        norm_w = getattr(parts.norm, "weight", None)
        if norm_w is not None:
            draft.norm.weight.copy_(norm_w.float())
    return draft


def draft_vocabulary(examples: Sequence[TokenizedExample], size: int, vocab_size: int,
                     teacher_top1: torch.Tensor | None = None) -> list[int]:
    """The ``size`` token ids the model itself produces most: its answers' tokens (response labels) plus, when given,
    its own greedy prediction at every cached position (``teacher_top1``, the teacher's argmax), counted together."""
    from collections import Counter

    counts: Counter[int] = Counter()
    for ex in examples:
        counts.update(t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE_INDEX)
    if teacher_top1 is not None and teacher_top1.numel():
        ids, n = torch.unique(teacher_top1.long(), return_counts=True)
        counts.update(dict(zip(ids.tolist(), n.tolist())))
    if not counts:
        raise ValueError("no tokens to count: generate answers first")
    ids = [t for t, _ in counts.most_common(size) if 0 <= t < vocab_size]
    return sorted(ids)


def weight_cost(draft: Eagle3Draft, model: nn.Module) -> float:
    """A draft token's cost as a share of a full step by weight bytes (batch-1 decoding is memory-bound): the
    draft's parameters (its embedding is the target's, one row read) over the target's layers + norm + LM head."""
    parts = decoder_parts(model)
    base = sum(p.numel() for layer in parts.layers for p in layer.parameters())
    base += parts.head.weight.numel() + sum(p.numel() for p in parts.norm.parameters())
    mine = sum(p.numel() for p in draft.parameters())
    return mine / base


# ============================================================================================ training


class Eagle3Objective(nn.Module):
    """Only the draft is registered (DeepSpeed, the optimizer and checkpoints see it alone); the frozen base model
    rides along unregistered: ``model`` (and ``weights``) let ``training.checkpoints`` save the stock base as the
    checkpoint's model directory, beside which the draft is written as ``eagle3/``."""

    def __init__(self, model: nn.Module, draft: Eagle3Draft, steps: int, decay: float,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.draft = draft
        object.__setattr__(self, "_base", model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.weights = {decoder_parts(model).num_layers: 1.0}
        self.steps, self.decay, self.temperature = steps, decay, temperature
        self.register_buffer("table", draft.target_to_draft(), persistent=False)

    @property
    def model(self) -> nn.Module:
        return self._base

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                aux: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor) -> dict:
        # Shape: input_ids/labels/attention_mask (B, T); aux (B, T, n*H) cached target features; teacher (B, T, k)
        b, t = input_ids.shape
        with torch.no_grad():
            embeds = self._base.get_input_embeddings()(input_ids[:, 1:])  # start i reads x_{i+1}
        fused = self.draft.fuse(aux[:, :-1].to(self.draft.fc.weight.dtype))  # and the features of position i
        positions = torch.arange(1, t, device=input_ids.device).expand(b, t - 1)
        outs = self.draft.unrolled(embeds.to(fused.dtype), fused, positions, self.steps)
        ids, probs, has = teacher_in_draft_vocab(teacher_ids, teacher_logp, self.table, self.temperature)
        target = torch.zeros_like(has)
        target[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) & has[:, :-1]  # p_t is a target: x_{t+1} is trained on
        out = ttt_loss(outs, ids, probs, target, step_weights(self.steps, self.decay), self.temperature)
        metrics = {f"ttt_loss_s{j}": v for j, v in out.per_step.items()}
        metrics.update({f"ttt_acc_s{j}": v for j, v in out.accuracy.items()})
        return {"loss": out.loss, "metrics": metrics,
                "num_tokens": torch.tensor(float(out.positions.get(0, 0)))}


def sequence_rows(cache, num_examples: int) -> list[tuple[int, int]]:
    """(first row, rows) of each example in a ``positions="all"`` cache (an example's rows are contiguous)."""
    seq = cache.seq.long()
    if seq.numel() > 1 and bool((seq[1:] < seq[:-1]).any()):
        raise ValueError("the teacher cache's rows are not in example order (built with positions='all'?)")
    counts = torch.bincount(seq, minlength=num_examples).tolist()
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    return list(zip(starts, counts))


def eagle3_batch(examples: Sequence[TokenizedExample], rows: Sequence[tuple[int, int]], cache,
                 aux_layers: Sequence[int], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences with their cached aux features and teacher rows. Shape: (B, T[, ...])."""
    b = len(examples)
    h = next(iter(cache.hidden.values())).shape[-1]
    k = cache.k
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    aux = torch.zeros((b, width, h * len(aux_layers)), dtype=torch.bfloat16)
    t_ids = torch.zeros((b, width, k), dtype=torch.long)
    t_logp = torch.full((b, width, k), -1e4, dtype=torch.float32)
    for i, (ex, (start, n)) in enumerate(zip(examples, rows, strict=True)):
        if n != len(ex.input_ids):
            raise ValueError(f"teacher cache holds {n} rows for an example of {len(ex.input_ids)} tokens")
        ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
        mask[i, :n] = 1
        aux[i, :n] = torch.cat([cache.hidden[a][start : start + n] for a in aux_layers], dim=-1)
        t_ids[i, :n] = cache.ids[start : start + n].long()
        t_logp[i, :n] = cache.logp[start : start + n].float()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "aux": aux, "teacher_ids": t_ids,
            "teacher_logp": t_logp}


def eagle3_epoch_batches(examples: Sequence[TokenizedExample], rows: Sequence[tuple[int, int]], cache,
                         aux_layers: Sequence[int], *, micro_batch: int, world: int, rank: int, grad_accum: int,
                         epoch: int, seed: int, pad_id: int, skip: int = 0, group_size: int = 0,
                         device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one epoch (the order and shares of ``training.loop.epoch_shards``, so resuming
    mid-epoch works as for every recipe), each sequence with its cache rows."""
    from layerexit.training.loop import epoch_shards, shared_widths

    index = {id(ex): i for i, ex in enumerate(examples)}
    shards = epoch_shards(examples, micro_batch=micro_batch, world=world, grad_accum=grad_accum, epoch=epoch,
                          seed=seed, skip=skip, group_size=group_size)
    widths = shared_widths(shards, micro_batch)
    mine = shards[rank]
    for bi, start in enumerate(range(0, len(mine), micro_batch)):
        chunk = mine[start : start + micro_batch]
        batch = eagle3_batch(chunk, [rows[index[id(ex)]] for ex in chunk], cache, aux_layers, widths[bi], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


# ============================================================================================ held-out acceptance


@dataclass
class HeldoutSequence:
    """A held-out prompt + the target's greedy answer, with the target's aux features and greedy token per position."""

    input_ids: torch.Tensor  # (T,)
    aux: torch.Tensor  # (T, n*H) float32
    greedy: torch.Tensor  # (T,) argmax of the target's distribution at each position
    prompt_len: int


@torch.no_grad()
def heldout_features(model: nn.Module, examples: Sequence[TokenizedExample], aux_layers: Sequence[int],
                     autocast: bool = False) -> list[HeldoutSequence]:
    """One forward of the target per held-out sequence: its features at the aux layers and its greedy tokens."""
    parts = decoder_parts(model)
    L = parts.num_layers
    device = parts.head.weight.device
    out = []
    for ex in examples:
        ids = torch.tensor([ex.input_ids], dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = collect_hidden_states(model, ids, [*aux_layers, L])
            greedy = parts.head(parts.norm(hidden[L][0])).argmax(-1)
        aux = torch.cat([hidden[a][0].float() for a in aux_layers], dim=-1)
        out.append(HeldoutSequence(ids[0].cpu(), aux.cpu(), greedy.cpu(), ex.prompt_len))
    return out


@dataclass
class DraftAcceptance:
    """Teacher-forced greedy acceptance of a feature draft on held-out answers."""

    per_position: list[float]  # conditional acceptance a_1..a_K (step j accepted given steps < j were)
    tau: dict[int, float]  # mean accepted length + 1 (bonus token) with k drafts, k = 1..K
    starts: int
    accepted_at: list[int] = field(default_factory=list)  # starts whose first j+1 steps were all accepted

    def predicted_speedup(self, k: int, cost: float) -> float:
        """tau(k) / (k c + 1): the weight-bytes cost model of ``tuning.draft_choice``."""
        return self.tau[k] / (k * cost + 1.0)

    def best_k(self, cost: float) -> int:
        return max(self.tau, key=lambda k: (round(self.predicted_speedup(k, cost), 6), -k))

    def metrics(self, prefix: str = "eagle3/") -> dict[str, float]:
        out = {f"{prefix}accept_pos{j + 1}": a for j, a in enumerate(self.per_position)}
        out.update({f"{prefix}tau_k{k}": t for k, t in self.tau.items()})
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "tau": {str(k): v for k, v in self.tau.items()}}


@torch.no_grad()
def draft_acceptance(draft: Eagle3Draft, sequences: Sequence[HeldoutSequence], max_draft: int = 5
                     ) -> DraftAcceptance:
    """Chain ``max_draft`` steps from every start of every held-out answer (teacher-forced, ``unrolled``) and count the
    leading steps whose argmax is the target's greedy token.

    Start i reads x_{i+1} (an answer token: i >= prompt_len - 1) and the target's features of position i; step j
    must equal greedy[i+1+j]; only starts with all ``max_draft`` targets inside the sequence (i + max_draft <= T - 2,
    the last position's next token is not in the sequence) count.
    """
    was_training = draft.training
    draft.eval()
    d2t = draft.draft_to_target.cpu()
    device = draft.fc.weight.device
    lead_counts = torch.zeros(max_draft + 1, dtype=torch.long)  # starts with exactly m leading accepts
    try:
        for s in sequences:
            t = s.input_ids.shape[0]
            first, last = max(s.prompt_len - 1, 0), t - 2 - max_draft
            if last < first:
                continue
            dtype = draft.fc.weight.dtype
            embeds = draft.embed(s.input_ids[None, 1:].to(device)).to(dtype)
            fused = draft.fuse(s.aux[None, :-1].to(device, dtype))
            positions = torch.arange(1, t, device=device)[None]
            outs = draft.unrolled(embeds, fused, positions, max_draft)
            ok = []
            for j, logits in enumerate(outs):
                pred = d2t[logits[0, first: last + 1].argmax(-1).cpu()]
                ok.append(pred == s.greedy[first + 1 + j: last + 2 + j])
            ok_t = torch.stack(ok, -1).long()  # (starts, K)
            lead = ok_t.cumprod(-1).sum(-1)  # leading accepted steps per start
            lead_counts += torch.bincount(lead, minlength=max_draft + 1)
    finally:
        draft.train(was_training)
    n = int(lead_counts.sum())
    reached = [int(lead_counts[m:].sum()) for m in range(max_draft + 1)]  # starts with >= m leading accepts
    per_position = [reached[j + 1] / reached[j] if reached[j] else 0.0 for j in range(max_draft)]
    lead = torch.arange(max_draft + 1)
    tau = {k: (1.0 + float((lead.clamp(max=k) * lead_counts).sum()) / n) if n else 1.0
           for k in range(1, max_draft + 1)}
    return DraftAcceptance(per_position, tau, n, reached[1:])


def plot_acceptance(curves: dict[str, DraftAcceptance], path: Path) -> Path:
    """Conditional acceptance by draft position, one line per curve (e.g. per evaluation step)."""
    from layerexit.training.draft_stage import plot_acceptance_lines

    return plot_acceptance_lines({f"{name} (tau@4 {acc.tau.get(4, float('nan')):.2f})": acc.per_position
                                  for name, acc in curves.items()}, path)


# ============================================================================================ driver side


def add_extra_sources(cfg, data: PreparedData, show_progress: bool = True) -> dict:
    """Append the configured extra training text to ``data.train``: Magpie-style self-written prompts with the model's
    greedy answers (``data.magpie_prompts``) and installed package documentation as plain text
    (``data.text_tokens``). Returns what was added (also in ``data.info``)."""
    d = cfg.data
    info: dict = {}
    if d.magpie_prompts:
        from layerexit.data.magpie import magpie_examples

        examples, meta = magpie_examples(cfg.model.spec, d.magpie_prompts, d.distill_max_new_tokens, d.max_length,
                                         show_progress=show_progress)
        data.train.extend(examples)
        info["magpie"] = meta
    if d.text_tokens:
        from layerexit.data.text_corpus import package_text_examples
        from layerexit.models.loading import load_tokenizer as _load_tokenizer

        examples, meta = package_text_examples(_load_tokenizer(cfg.model.spec), d.text_tokens, d.max_length)
        data.train.extend(examples)
        info["text"] = meta
    if info:
        data.info.setdefault("extra_sources", {}).update(info)
    return info


def prepare_eagle3_teacher(cfg, data: PreparedData, aux_layers: Sequence[int], console=None):
    """The teacher cache over every position of the training sequences, with the aux layers' features."""
    from layerexit.data.teacher_cache import build_teacher_cache

    d = cfg.distill
    return build_teacher_cache(cfg.model.spec, data.train, k=d.top_k, temperature=d.temperature,
                               layers=sorted(set(aux_layers)), precision=d.cache_precision, directory=d.cache_dir,
                               num_tasks=d.cache_tasks, gpus_per_task=d.cache_gpus, console=console, positions="all")


def answer_top1(examples: Sequence[TokenizedExample], rows: Sequence[tuple[int, int]], cache) -> torch.Tensor:
    """The teacher's own greedy token at every answer position of the conversations (prompted examples)."""
    keep = torch.zeros(cache.num_positions, dtype=torch.bool)
    for ex, (start, n) in zip(examples, rows, strict=True):
        if ex.prompt_len <= 0:
            continue
        resp = [t for t in range(n - 1) if ex.labels[t + 1] != IGNORE_INDEX]
        if resp:
            keep[torch.tensor(resp, dtype=torch.long) + start] = True
    return cache.ids[keep, 0]


def prepare_eagle3(cfg, data: PreparedData, depth: int, console=None) -> tuple:
    """Driver side of ``recipe: eagle3``: the teacher cache (every position, aux features), the draft vocabulary
    (the model's own answers and greedy tokens on the training conversations) and what the workers need."""
    from transformers import AutoConfig

    from layerexit.models.eagle3 import default_aux_layers
    from layerexit.models.loading import resolve_model

    aux = list(cfg.eagle3.aux_layers) if cfg.eagle3.aux_layers is not None else list(default_aux_layers(depth))
    model_config = AutoConfig.from_pretrained(resolve_model(cfg.model.spec).location)
    vocab_size = int(getattr(model_config, "vocab_size", None) or model_config.get_text_config().vocab_size)
    if cfg.eagle3.vocab_size > vocab_size:
        from layerexit.errors import ConfigError

        raise ConfigError(f"eagle3.vocab_size={cfg.eagle3.vocab_size} is larger than the model's vocabulary "
                          f"({vocab_size})", f"choose N in 1..{vocab_size}")
    cache = prepare_eagle3_teacher(cfg, data, aux, console)
    rows = sequence_rows(cache, len(data.train))
    conversations = [ex for ex in data.train if ex.prompt_len > 0] or data.train
    vocab = draft_vocabulary(conversations, cfg.eagle3.vocab_size, vocab_size, answer_top1(data.train, rows, cache))
    data.info["eagle3"] = {"aux_layers": aux, "draft_vocab_size": len(vocab), "draft_vocab_asked": cfg.eagle3.vocab_size,
                           "cache_positions": cache.num_positions}
    if console is not None:
        console.print(f"eagle3: aux layers {aux}, draft vocabulary {len(vocab)} ids (asked {cfg.eagle3.vocab_size}), "
                      f"{cache.num_positions} cached positions")
    cache.hidden = {}  # the workers read the features from the cache directory; the driver keeps no copy
    target = {"model": cfg.model.spec, "num_layers": depth, "vocab_size": vocab_size}
    return cache, {"eagle3_aux_layers": aux, "eagle3_vocab": vocab, "eagle3_target": target}


def ship_eagle3(cfg, hf_dir: Path, data: PreparedData, run, console=None) -> dict:
    """After training: measure the shipped draft on the held-out answers, choose the draft length from measured
    acceptance and the weight-bytes cost, and write ``draft_settings.json`` (+ ``draft_vocab.json``) beside
    ``eagle3/`` so the registered model drafts as measured. Logs the figures and a plot."""
    from layerexit.engine.heads import save_draft_vocab
    from layerexit.models.draft_settings import VOCAB_FILE, write_draft_settings
    from layerexit.models.eagle3 import check_target, load_eagle3
    from layerexit.models.loading import load_model_and_tokenizer

    e = cfg.eagle3
    model, tok = load_model_and_tokenizer(str(hf_dir), dtype=torch.float32)
    draft = load_eagle3(Path(hf_dir) / EAGLE3_DIR, model.get_input_embeddings())
    check_target(draft.spec, model.config, "eagle3")
    sequences = heldout_features(model, data.eval[: e.final_eval_prompts], draft.spec.aux_layers)
    acc = draft_acceptance(draft, sequences, e.max_draft)
    cost = weight_cost(draft, model)
    k = acc.best_k(cost)
    save_draft_vocab(Path(hf_dir) / VOCAB_FILE, draft.draft_to_target.tolist(), tok)
    write_draft_settings(hf_dir, {"draft": "eagle3", "num_draft": k, "draft_vocab": VOCAB_FILE})
    summary = {"num_draft": k, "cost_ratio": cost, "predicted_speedup": acc.predicted_speedup(k, cost),
               "draft_vocab_size": draft.spec.draft_vocab_size, "aux_layers": list(draft.spec.aux_layers),
               "heldout_sequences": len(sequences), "acceptance": acc.to_dict(),
               "predicted_speedup_by_k": {str(j): acc.predicted_speedup(j, cost) for j in acc.tau}}
    metrics = acc.metrics("eagle3/final_")
    metrics.update({"eagle3/num_draft": k, "eagle3/cost_ratio": cost,
                    "eagle3/predicted_speedup": acc.predicted_speedup(k, cost), "eagle3/heldout_starts": acc.starts})
    run.log_metrics(metrics)
    run.log_dict(summary, "eagle3_choice.json")
    with tempfile.TemporaryDirectory() as tmp:
        run.log_artifact(plot_acceptance({"held-out": acc}, Path(tmp) / "eagle3_acceptance.png"), "eagle3")
    if console is not None:
        console.print("eagle3: acceptance by position " + " ".join(f"{a:.0%}" for a in acc.per_position)
                      + "; tau " + " ".join(f"k{j}={t:.2f}" for j, t in acc.tau.items())
                      + f"; cost {cost:.3f} of a step; ships k={k} (predicted {acc.predicted_speedup(k, cost):.2f}x)")
    return summary

