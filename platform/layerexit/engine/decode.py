"""The early-exit engine over token ids: its public API and the building blocks the decode loop uses.

``EarlyExitEngine.generate`` / ``stream`` run ``engine/loop.py``, the only decode loop: early exit (every
policy and KV strategy), self-speculative verification of drafts and continuous batching are modes of it.
This module holds what one step is made of: running a decoder layer, masks and rotary embeddings, the heads
(``engine/heads.py``), K/V propagation; the result types live in ``engine/results.py`` (re-exported here).

Per step, every active sequence asks its exit policy where to stop. A batch shares one pass through the
layers, so the batch runs to the deepest layer any of its sequences needs (the *batch rule*); each sequence
still takes its token from its own exit layer. The extra layers a shallow sequence rides along for are
counted in its FLOPs, and they are not wasted with ``recompute``: its cache for those layers is then exact.

KV strategies for the layers a token skipped (see ``ExitKVCache``):
- ``none``: no cache at all; every step recomputes the whole prefix (the LITE paper's setting).
- ``recompute``: positions left behind are carried through the deeper layers together with the next token
  that goes deeper, in the same pass (exact: the cache ends equal to the full model's).
- ``propagate``: after an exit at layer e, only K/V projections of layers e+1..L are computed from h_e and
  cached (CALM; approximate, cheap).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from layerexit.engine.compiled import CompiledDecode
from layerexit.engine.flops import FlopsModel
from layerexit.engine.heads import CandidateHead, FullHead, adapter_flops, normed_exit
from layerexit.engine.layers import fuse_layers
from layerexit.engine.loop import DecodeLoop
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.results import BatchJoiner, SequenceResult, TokenEvent
from layerexit.errors import ConfigError
from layerexit.models.draft_settings import apply_draft_settings, draft_settings_of
from layerexit.models.exits import decoder_parts

__all__ = ["BatchJoiner", "EarlyExitEngine", "SequenceResult", "TokenEvent"]  # the result types are re-exported


class EarlyExitEngine:
    """Early-exit generation for a LLaMA-family ``*ForCausalLM`` on token ids."""

    def __init__(self, model, eos_token_ids: set[int] | Sequence[int], pad_token_id: int, fused: bool = True,
                 compile: bool = False) -> None:
        """``fused``: decode with Q/K/V and gate/up fused into one product each (``engine/layers.py``), when the
        layout allows and the copies fit its memory budget; the stock layers otherwise. ``compile``: run
        single-column decode steps through a static cache and ``torch.compile``d layer segments
        (``engine/compiled.py``; compiled lazily, eager with a logged reason if compiling fails)."""
        self.model = model
        self.parts = decoder_parts(model)
        self.L = self.parts.num_layers
        self.flops = FlopsModel.from_config(model.config)
        self.eos = set(int(e) for e in eos_token_ids)
        self.pad = int(pad_token_id)
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.eager = getattr(cfg, "_attn_implementation", "sdpa") == "eager"
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        if self.dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{torch.cuda.get_device_name(self.device)} has no bfloat16 support",
                              "load the model with dtype float16 or float32")
        self.full_head = FullHead(self.parts)
        self.candidate_head = CandidateHead(self.parts)
        self.vocab = self.full_head.vocab
        self.fused = fuse_layers(self.parts.layers) if fused else None
        self.compiled = CompiledDecode(self) if compile else None
        # Tests and debugging only: keep the last batch's cache after it ends. Off by default, so the engine
        # never holds a finished batch's memory.
        self.keep_last_cache = False
        self.last_cache = None
        self.last_rows = None  # the loop's rows (tokens, valid columns) with that cache
        self._feature_drafter = None  # the EAGLE-3 draft (``draft: eagle3``), loaded on first use

    def attach_eagle3(self, draft) -> None:
        """Draft with this ``Eagle3Draft`` (``models/eagle3.py``) under ``draft: eagle3``; a draft trained for
        another model is refused (ConfigError naming the field)."""
        from layerexit.engine.drafters import FeatureDrafter

        self._feature_drafter = FeatureDrafter(self, draft)

    def feature_drafter(self):
        """The EAGLE-3 drafter: the attached draft, else the one the model ships in ``<model dir>/eagle3``."""
        if self._feature_drafter is None:
            from layerexit.engine.drafters import EAGLE3_DIR, find_eagle3
            from layerexit.models.eagle3 import load_eagle3

            path = find_eagle3(self.model)
            if path is None:
                raise ConfigError(f"draft 'eagle3': this model ships no EAGLE-3 draft (no {EAGLE3_DIR}/ directory "
                                  "beside its weights)",
                                  "use a model registered with one (models:/layerexit-smollm2_eagle3@trained) or "
                                  "another draft source (layer, ngram)")
            self.attach_eagle3(load_eagle3(path, self.parts.embed, dtype=self.dtype))
        return self._feature_drafter

    # ----------------------------------------------------------------------------------------- public API
    def generate(self, prompts: Sequence[Sequence[int]], exit_config: ExitConfig | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 replay: Sequence[Sequence[int]] | None = None) -> list[SequenceResult]:
        """Run ``stream`` to the end and collect one result per prompt."""
        results = [SequenceResult() for _ in prompts]
        t0 = time.perf_counter()
        for events in self.stream(prompts, exit_config, sampling, results=results, replay=replay):
            now = time.perf_counter() - t0
            for ev in events:
                r = results[ev.index]
                r.token_ids.append(ev.token_id)
                r.exit_layers.append(ev.exit_layer)
                r.confidences.append(ev.confidence)
                r.flops += ev.flops
                r.flops_full += ev.flops_full
                if ev.logprob is not None:
                    r.logprobs.append(ev.logprob)
                    r.top_logprobs.append(ev.top_logprobs or [])
                if ev.drafted:
                    r.count_draft(ev.drafted, ev.accepted)
                r.seconds = now
                if ev.finished:
                    r.finish_reason = ev.finish_reason
        return results

    def stream(self, prompts: Sequence[Sequence[int]], exit_config: ExitConfig | None = None,
               sampling: SamplingParams | Sequence[SamplingParams] | None = None,
               results: list[SequenceResult] | None = None,
               joiner: "BatchJoiner | None" = None,
               replay: Sequence[Sequence[int]] | None = None) -> Iterator[list[TokenEvent]]:
        """Yield, step by step, the tokens produced for every still-active sequence (self-speculative steps
        yield several tokens per row).

        With a ``joiner`` (continuous batching), new prompts join the running batch between steps and rows the
        caller cancelled leave it; joined rows get the next caller indices (len(prompts), len(prompts)+1, ...)
        and, when ``results`` is given, their entries are appended to it. ``kv: none`` never takes joins.

        ``replay`` (benchmarks: the loop's own ceiling): one reference answer per prompt, drafted back to a
        self-speculative config at no draft cost (k = its ``num_draft``), instead of its draft source."""
        from layerexit.models.exit_presets import apply_exit_preset, exit_presets_of

        exit_config = apply_exit_preset(exit_config or ExitConfig(), exit_presets_of(self.model))
        exit_config = apply_draft_settings(exit_config, draft_settings_of(self.model))
        params = self.sampling_list(sampling, len(prompts))
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token", "pass non-empty prompts")
        loop = DecodeLoop(self, exit_config, params, replay=replay)
        with torch.inference_mode():
            yield from loop.run(prompts, params, results, joiner)

    # ------------------------------------------------------------------------------------- building blocks
    def sampling_list(self, sampling, n: int) -> list[SamplingParams]:
        if sampling is None:
            sampling = SamplingParams()
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
        if len(params) != n:
            raise ConfigError(f"{len(params)} sampling settings for {n} prompts", "pass one per prompt or one for all")
        return [p.validate() for p in params]

    _sampling_list = sampling_list  # the name older callers use

    def attention_mask(self, valid: torch.Tensor, q_start: int, n: int) -> torch.Tensor:
        """(B, 1, n, kv) mask for queries at columns q_start.. over keys 0..q_start+n-1."""
        kv = q_start + n
        q_pos = torch.arange(q_start, kv, device=valid.device)[:, None]
        k_pos = torch.arange(kv, device=valid.device)[None, :]
        mask = valid[:, None, None, :kv] & (k_pos <= q_pos)[None, None]
        mask = mask | (k_pos == q_pos)[None, None]  # a padded query sees itself: no all-masked row, no NaN
        if self.eager:
            return torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        return mask

    def positions(self, pad_off: torch.Tensor, q_start: int, n: int) -> torch.Tensor:
        """RoPE positions of columns q_start..q_start+n-1 for rows left-padded by ``pad_off`` (no holes)."""
        pos = torch.arange(q_start, q_start + n, device=pad_off.device)[None, :] - pad_off[:, None]
        return pos.clamp(min=0)

    def run_layer(self, k: int, h: torch.Tensor, mask, pos: torch.Tensor, rope, cache) -> torch.Tensor:
        """Decoder layer k (1-based) on h (B, n, H)."""
        if self.fused is not None and rope is not None:
            return self.fused[k - 1](h, mask, pos, rope, cache)
        # transformers 5.24 renamed the layer's cache argument to ``cache`` (``past_key_values`` is deprecated
        # and removed in 5.40).
        out = self.parts.layers[k - 1](
            h, attention_mask=mask, position_ids=pos, cache=cache, use_cache=cache is not None,
            position_embeddings=rope,
        )
        return out[0] if isinstance(out, tuple) else out

    def rope(self, h: torch.Tensor, pos: torch.Tensor):
        return self.parts.rotary(h, position_ids=pos) if self.parts.rotary is not None else None

    def propagate_kv(self, k: int, h: torch.Tensor, pos: torch.Tensor, rope, cache) -> None:
        """CALM: K/V of layer k computed from a lower layer's hidden state h (B, n, H), appended to the cache."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer = self.parts.layers[k - 1]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (*x.shape[:-1], -1, self.head_dim)
        key = attn.k_proj(x).view(shape).transpose(1, 2)
        value = attn.v_proj(x).view(shape).transpose(1, 2)
        if getattr(attn, "k_norm", None) is not None:
            key = attn.k_norm(key)
        if rope is not None:
            cos, sin = rope
            key, _ = apply_rotary_pos_emb(key, key, cos, sin)
        cache.update(key, value, k - 1)

    def head_probs(self, h: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary logits and probabilities (n, V) of an exit at ``layer`` (default: the final layer)."""
        logits = self.full_head.logits(h, self.L if layer is None else layer)
        return logits, logits.softmax(dim=-1)

    def normed(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The final-normed exit hidden state (through the exit's adapter): what probes look at."""
        return normed_exit(self.parts, layer, h)

    def adapter_flops(self, layer: int, positions: int) -> int:
        return adapter_flops(self.parts, layer, positions)
