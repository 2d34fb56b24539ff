"""The distill and adapters recipes (``recipe:`` in the training config); CE-LITE stays in ``training.loop``.

- ``distill``: full fine-tuning; every exit gets the top-k KL towards the frozen base model's final layer
  (from the teacher cache, carried in each batch), the final layer the same KL as an anchor.
- ``adapters``: the base model is frozen and not handed to DeepSpeed at all; one ``ExitAdapter`` per exit is
  trained by the top-k KL on the base model's cached exit hidden states (no decoder layer runs while training).

Driver side: ``add_sampled_examples`` (more answers per training instruction) and ``prepare_teacher`` (build or
read the cache). Worker side: the two objectives and the batches over cached positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from layerexit.data.datasets import PreparedData, TokenizedExample, finish_example
from layerexit.data.teacher_cache import TeacherCache
from layerexit.losses.distill import distill_loss
from layerexit.models.exits import collect_hidden_states, decoder_parts
from layerexit.training.config import TrainConfig

# ============================================================================================ driver side


def add_sampled_examples(cfg: TrainConfig, data: PreparedData, show_progress: bool = True) -> int:
    """Append ``data.samples_per_instruction`` sampled base-model answers per TRAINING instruction to ``data.train``
    (the held-out split is never sampled); returns how many examples were added."""
    d = cfg.data
    if d.source != "instructions" or d.samples_per_instruction < 1:
        return 0
    from layerexit.data.instructions import interleave_categories, load_instructions, split_instructions
    from layerexit.data.selfdistill import sample_responses

    train_items, _ = split_instructions(load_instructions(d.path))
    train_items = interleave_categories(train_items)
    if d.max_train_examples is not None:
        train_items = train_items[: d.max_train_examples]
    samples, path = sample_responses(cfg.model.spec, train_items, d.samples_per_instruction, d.sample_temperature,
                                     d.sample_top_p, d.distill_max_new_tokens, show_progress=show_progress)
    added = 0
    for s in samples:
        ex = finish_example([*s.prompt_ids, *s.response_ids], [-100] * len(s.prompt_ids) + list(s.response_ids),
                            len(s.prompt_ids), d.max_length)
        if ex is not None:
            data.train.append(ex)
            added += 1
    data.info["sampled"] = {"added": added, "per_instruction": d.samples_per_instruction,
                            "temperature": d.sample_temperature, "top_p": d.sample_top_p, "cache": str(path)}
    return added


def trains_on_sequences(cfg: TrainConfig) -> bool:
    """Whether batches are whole sequences carrying their teacher rows (distill, decoder-layer adapters) rather
    than cached single positions (MLP adapters)."""
    return cfg.recipe == "distill" or (cfg.recipe == "adapters" and cfg.adapters.kind == "decoder_layer")


def cache_layers(cfg: TrainConfig) -> list[int]:
    """Exit layers whose hidden states the cache stores (only MLP adapters train on cached single positions)."""
    return sorted(cfg.lite.exit_layers) if cfg.recipe == "adapters" and cfg.adapters.kind == "mlp" else []


def prepare_teacher(cfg: TrainConfig, data: PreparedData, console=None) -> TeacherCache:
    """Build (Ray tasks) or read the teacher cache for the training split; distill: attach each example's rows."""
    from layerexit.data.teacher_cache import build_teacher_cache

    d = cfg.distill
    cache = build_teacher_cache(cfg.model.spec, data.train, k=d.top_k, temperature=d.temperature,
                                layers=cache_layers(cfg), precision=d.cache_precision, directory=d.cache_dir,
                                num_tasks=d.cache_tasks, gpus_per_task=d.cache_gpus, console=console)
    if trains_on_sequences(cfg):
        attach_teacher(data.train, cache)
    return cache


def attach_teacher(examples: list[TokenizedExample], cache: TeacherCache) -> None:
    """Give every example its cache rows (positions, top-k ids, log-probs) so ``collate`` batches them."""
    order = torch.argsort(cache.seq.long(), stable=True)
    counts = torch.bincount(cache.seq.long(), minlength=len(examples)).tolist()
    start = 0
    for i, ex in enumerate(examples):
        rows = order[start : start + counts[i]]
        start += counts[i]
        ex.teacher = (cache.pos[rows].clone(), cache.ids[rows].clone(), cache.logp[rows].clone())


def steps_for_cache(cfg: TrainConfig, cache: TeacherCache) -> int:
    """Optimizer steps of the adapters recipe: epochs over the cached positions (tail dropped), capped by max_steps."""
    from layerexit.errors import ConfigError

    per_step = cfg.adapters.positions_per_batch * cfg.scaling.num_workers * cfg.optim.grad_accum
    per_epoch = cache.num_positions // per_step
    if per_epoch < 1:
        raise ConfigError(f"adapters.positions_per_batch: {cache.num_positions} cached positions do not fill one "
                          f"step of {per_step}", "lower adapters.positions_per_batch or add data")
    steps = per_epoch * cfg.optim.epochs
    return min(steps, cfg.optim.max_steps) if cfg.optim.max_steps else steps


# ============================================================================================ worker side


def _head_weight(head: nn.Module):
    """The LM head's weight, gathered on every rank under ZeRO-3 (partitioned parameters are empty shards)."""
    w = head.weight
    if hasattr(w, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([w])
    return contextlib.nullcontext()


class AdapterObjective(nn.Module):
    """The adapters recipe's training module: only the adapters are registered (so DeepSpeed, the optimizer and
    the checkpoints see them alone); the frozen base model rides along unregistered. ``model`` and ``weights``
    make ``training.checkpoints`` save the stock base model as the checkpoint's HF directory."""

    def __init__(self, model: nn.Module, adapters: Mapping[int, nn.Module], weights: Mapping[int, float],
                 temperature: float, full_every: int, chunk_size: int | None) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({str(l): a for l, a in adapters.items()})
        object.__setattr__(self, "_base", model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.weights = {l: w for l, w in weights.items() if str(l) in self.adapters}
        self.temperature, self.full_every, self.chunk_size = temperature, full_every, chunk_size

    @property
    def model(self) -> nn.Module:
        return self._base

    def adapter_map(self) -> dict[int, nn.Module]:
        return {int(l): a for l, a in self.adapters.items()}

    def forward(self, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                **hidden: torch.Tensor) -> dict:
        # Shape: hidden_l<l> (P, H) cached pre-norm exit states; teacher_ids/logp (P, k); mask (P,)
        parts = decoder_parts(self._base)
        exit_h = {l: self.adapters[str(l)](hidden[f"hidden_l{l}"].float()) for l in self.weights}
        with _head_weight(parts.head):
            out = distill_loss(exit_h, teacher_ids, teacher_logp, mask, parts.norm, parts.head.weight, self.weights,
                               self.temperature, self.full_every, self.chunk_size)
        return {"loss": out.loss, "per_layer": out.per_layer, "num_tokens": torch.tensor(float(out.num_positions))}


class DecoderAdapterObjective(AdapterObjective):
    """Decoder-layer adapters on the frozen base: layers 1..max(exit) run without gradients on each batch of
    sequences, each exit's adapter attends over its exit's hidden states, and the top-k KL towards the teacher
    cache trains the adapters alone (only they are registered, as in ``AdapterObjective``, whose set-up it
    shares; only the batches differ: sequences here, cached positions there)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                teacher_ids: torch.Tensor, teacher_logp: torch.Tensor, teacher_mask: torch.Tensor) -> dict:
        # Shape: input_ids (B, T); teacher_ids/logp (B, k, T) (sequence axis last); teacher_mask (B, T)
        from layerexit.models.exits import default_position_ids, prepare_layer_inputs, run_layers

        parts = decoder_parts(self._base)
        exits = sorted(self.weights)
        pos = default_position_ids(attention_mask, input_ids)
        hidden: dict[int, torch.Tensor] = {}
        with torch.no_grad():  # the frozen base: no activations kept for backward
            h = parts.embed(input_ids)
            inputs = prepare_layer_inputs(parts, h, attention_mask, pos)
            done = 0
            for l in exits:
                h = run_layers(parts, h, done, l, inputs)
                hidden[l], done = h, l
        exit_h = {l: self.adapters[str(l)](hidden[l], attention_mask, pos).flatten(0, 1) for l in exits}
        ids = teacher_ids.transpose(1, 2).flatten(0, 1)  # Shape: (B*T, k)
        logp = teacher_logp.transpose(1, 2).flatten(0, 1)  # Shape: (B*T, k)
        with _head_weight(parts.head):
            out = distill_loss(exit_h, ids, logp, teacher_mask.flatten(), parts.norm, parts.head.weight,
                               self.weights, self.temperature, self.full_every, self.chunk_size)
        return {"loss": out.loss, "per_layer": out.per_layer, "num_tokens": torch.tensor(float(out.num_positions))}


class DistillObjective(nn.Module):
    """The distill recipe's training module (full fine-tuning): top-k KL at every exit + anchor at the final layer.
    Same surface as ``LiteObjective`` (``model``, ``weights``) so checkpoints and evaluation treat it alike."""

    def __init__(self, model: nn.Module, weights: Mapping[int, float], temperature: float, full_every: int,
                 chunk_size: int | None, anchor_weight: float) -> None:
        super().__init__()
        self.model = model
        self.weights = dict(weights)
        self.temperature, self.full_every, self.chunk_size = temperature, full_every, chunk_size
        self.anchor_weight = anchor_weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                teacher_ids: torch.Tensor, teacher_logp: torch.Tensor, teacher_mask: torch.Tensor) -> dict:
        # Shape: input_ids (B, T); teacher_ids/logp (B, k, T) (sequence axis last); teacher_mask (B, T)
        parts = decoder_parts(self.model)
        L = parts.num_layers
        exits = {l: w for l, w in self.weights.items() if l != L}
        hidden = collect_hidden_states(self.model, input_ids, [*exits, L], attention_mask)
        ids = teacher_ids.transpose(1, 2).flatten(0, 1)  # Shape: (B*T, k)
        logp = teacher_logp.transpose(1, 2).flatten(0, 1)  # Shape: (B*T, k)
        mask = teacher_mask.flatten()  # Shape: (B*T,)
        exit_h = {l: hidden[l].flatten(0, 1) for l in exits}  # Shape: (B*T, H) each
        with _head_weight(parts.head):
            out = distill_loss(exit_h, ids, logp, mask, parts.norm, parts.head.weight, exits, self.temperature,
                               self.full_every, self.chunk_size, final_hidden=hidden[L].flatten(0, 1),
                               anchor_weight=self.anchor_weight)
        result = {"loss": out.loss, "per_layer": out.per_layer, "num_tokens": torch.tensor(float(out.num_positions))}
        if out.anchor is not None:
            result["anchor"] = out.anchor
        return result


def cache_epoch_batches(cache: TeacherCache, layers: list[int], *, positions: int, world: int, rank: int,
                        grad_accum: int, epoch: int, seed: int, skip: int = 0,
                        device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of cached positions for one epoch, after its first ``skip`` positions (a global
    count, as in ``training.loop.epoch_batches``): a seeded shuffle, equal share per rank, every micro-batch exactly
    ``positions`` rows (so every rank makes the same head calls)."""
    from layerexit.training.loop import epoch_order, rank_share

    order = epoch_order(cache.num_positions, epoch=epoch, seed=seed)
    mine = torch.tensor(rank_share(order, skip=skip, per_step=positions * world * grad_accum, world=world,
                                   rank=rank), dtype=torch.long)
    for start in range(0, len(mine), positions):
        idx = mine[start : start + positions]
        batch = {"teacher_ids": cache.ids[idx].long(), "teacher_logp": cache.logp[idx].float(),
                 "mask": torch.ones(len(idx))}
        batch.update({f"hidden_l{l}": cache.hidden[l][idx] for l in layers})
        yield {k: v.to(device) for k, v in batch.items()}


def save_checkpoint_adapters(objective: AdapterObjective, hf_dir: Path, tokenizer) -> Path:
    """Write the adapters into ``<hf_dir>/exit_adapters`` with the base model's fingerprint."""
    from layerexit.models.adapters import ADAPTERS_DIR, base_fingerprint, save_adapters

    return save_adapters(objective.adapter_map(), Path(hf_dir) / ADAPTERS_DIR,
                         base_fingerprint(objective.model, tokenizer))
