"""The early-exit decode loop over token ids: batched, streaming, with exact FLOPs per token.

Per step, every active sequence asks its exit policy where to stop. A batch shares one pass through the
layers, so the batch runs to the deepest layer any of its sequences needs (the *batch rule*); each sequence
still takes its token from its own exit layer. The extra layers a shallow sequence rides along for are
counted in its FLOPs, and they are not wasted with ``recompute``: its cache for those layers is then exact.
Policies that choose the exit without logits (probe, fixed, random, ...) keep each row's hidden state at its exit
and evaluate the LM head once per step for the whole batch; only logit-based checks (confidence, classifier) need
a head evaluation at each layer they check.

KV strategies for the layers a token skipped (see ``ExitKVCache``):
- ``none``: no cache at all; every step recomputes the whole prefix (the LITE paper's setting).
- ``recompute``: positions left behind are carried through the deeper layers together with the next token
  that goes deeper, in the same pass (exact: the cache ends equal to the full model's).
- ``propagate``: after an exit at layer e, only K/V projections of layers e+1..L are computed from h_e and
  cached (CALM; approximate, cheap).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from layerexit.engine.cache import ExitKVCache
from layerexit.engine.flops import FlopsModel
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.policies import ExitPolicy
from layerexit.engine.reference import pad_left
from layerexit.errors import ConfigError
from layerexit.models.exits import decoder_parts


@dataclass
class TokenEvent:
    """One generated token of one sequence, as the stream yields it."""

    index: int  # position of the sequence in the caller's prompt list
    token_id: int
    exit_layer: int
    confidence: float
    flops: int  # FLOPs spent producing this token
    flops_full: int  # what the same token costs at full depth (same KV strategy)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS / stop id) or "length"
    # Only when the row's SamplingParams.logprobs is set: log-softmax of the chosen token under the full-vocabulary
    # distribution of the layer the token was taken from (self-speculative: the verifying final layer), and the
    # top-k (token id, logprob) pairs of that distribution.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class SequenceResult:
    """Everything about one generated sequence."""

    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    flops: int = 0
    flops_full: int = 0
    prefill_flops: int = 0
    seconds: float = 0.0
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)  # filled when SamplingParams.logprobs is set
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Decision:
    tokens: torch.Tensor  # (n,)
    layers: torch.Tensor  # (n,)
    confidence: torch.Tensor  # (n,)
    heads: torch.Tensor  # (n,) LM-head evaluations per row
    probes: torch.Tensor | None = None  # (n,) probe evaluations per row (probe policy)

    def cat(self, other: "_Decision") -> "_Decision":
        """This batch's decisions followed by ``other``'s (rows that joined this step)."""
        probes = None if self.probes is None else torch.cat([self.probes, other.probes])
        return _Decision(torch.cat([self.tokens, other.tokens]), torch.cat([self.layers, other.layers]),
                         torch.cat([self.confidence, other.confidence]), torch.cat([self.heads, other.heads]),
                         probes)


class BatchJoiner(Protocol):
    """What a caller gives ``EarlyExitEngine.stream`` for continuous batching; called between steps."""

    def admit(self, max_prompt_len: int, rows: int) -> list[tuple[Sequence[int], SamplingParams]]:
        """New (prompt ids, sampling) rows to add now, each prompt at most ``max_prompt_len`` tokens;
        ``rows`` is how many rows the batch holds."""
        ...

    def cancelled(self, index: int) -> bool:
        """Whether the caller no longer wants the row with this index (it leaves the batch)."""
        ...


@dataclass
class _Rows:
    """Per-row decode state of a running batch; positions are columns of width ``width``."""

    tokens: torch.Tensor  # (B, width) token ids (pad where not valid)
    valid: torch.Tensor  # (B, width) which positions hold a real token
    pad_off: torch.Tensor  # (B,) first valid position of each row
    index: torch.Tensor  # (B,) the caller's index of each row
    counts: torch.Tensor  # (B,) tokens generated so far
    cache: ExitKVCache | None
    deep_h: torch.Tensor | None  # (B, width, H) hidden state where each position stopped (recompute catch-up)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def keep(self, rows: torch.Tensor) -> None:
        on = rows.to(self.tokens.device)
        self.tokens, self.valid, self.pad_off = self.tokens[on], self.valid[on], self.pad_off[on]
        self.index, self.counts = self.index[rows], self.counts[rows]
        if self.cache is not None:
            self.cache.select_rows(on)
            self.deep_h = self.deep_h[on]

    def widen(self, width: int, pad: int) -> None:
        extra = width - self.width
        B = self.tokens.shape[0]
        self.tokens = torch.cat([self.tokens, self.tokens.new_full((B, extra), pad)], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros((B, extra))], dim=1)
        if self.cache is not None:
            self.cache.widen(width)
            self.deep_h = torch.cat([self.deep_h, self.deep_h.new_zeros((B, extra, self.deep_h.shape[2]))], dim=1)

    def extend(self, other: "_Rows") -> None:
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.valid = torch.cat([self.valid, other.valid])
        self.pad_off = torch.cat([self.pad_off, other.pad_off])
        self.index = torch.cat([self.index, other.index])
        self.counts = torch.cat([self.counts, other.counts])
        if self.cache is not None:
            self.cache.extend(other.cache)
            self.deep_h = torch.cat([self.deep_h, other.deep_h])


class _RowSampler:
    """Greedy or temperature/top-p sampling per row, each row with its own seeded generator."""

    def __init__(self, params: Sequence[SamplingParams]) -> None:
        self.params = list(params)
        self.generators = []
        for p in self.params:
            g = torch.Generator()
            g.manual_seed(p.seed if p.seed is not None else torch.seed() % (2**63))
            self.generators.append(g)

    def select(self, rows: torch.Tensor) -> None:
        keep = rows.tolist()
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]

    def extend(self, other: "_RowSampler") -> None:
        self.params += other.params
        self.generators += other.generators

    def pick(self, rows: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        # Shape: logits, probs (n, V) for batch rows ``rows`` -> tokens (n,), on the CPU
        out = probs.argmax(dim=-1).cpu()
        for j, r in enumerate(rows.tolist()):
            p = self.params[r]
            if p.temperature <= 0:
                continue
            dist = torch.softmax(logits[j].float().cpu() / p.temperature, dim=-1)  # the row's generator is a CPU one
            if p.top_p < 1.0:
                sorted_p, idx = dist.sort(descending=True)
                cut = sorted_p.cumsum(0) - sorted_p > p.top_p
                sorted_p[cut] = 0.0
                dist = torch.zeros_like(dist).scatter_(0, idx, sorted_p)
            out[j] = torch.multinomial(dist / dist.sum(), 1, generator=self.generators[r])[0]
        return out


class EarlyExitEngine:
    """Early-exit generation for a LLaMA-family ``*ForCausalLM`` on token ids."""

    def __init__(self, model, eos_token_ids: set[int] | Sequence[int], pad_token_id: int) -> None:
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

    # ----------------------------------------------------------------------------------------- public API
    def generate(self, prompts: Sequence[Sequence[int]], exit_config: ExitConfig | None = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[SequenceResult]:
        """Run ``stream`` to the end and collect one result per prompt."""
        results = [SequenceResult() for _ in prompts]
        t0 = time.perf_counter()
        for events in self.stream(prompts, exit_config, sampling, results=results):
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
                r.seconds = now
                if ev.finished:
                    r.finish_reason = ev.finish_reason
        return results

    def stream(self, prompts: Sequence[Sequence[int]], exit_config: ExitConfig | None = None,
               sampling: SamplingParams | Sequence[SamplingParams] | None = None,
               results: list[SequenceResult] | None = None,
               joiner: "BatchJoiner | None" = None) -> Iterator[list[TokenEvent]]:
        """Yield, step by step, the tokens produced for every still-active sequence.

        With a ``joiner`` (continuous batching), new prompts join the running batch between steps and rows the
        caller cancelled leave it; joined rows get the next caller indices (len(prompts), len(prompts)+1, ...)
        and, when ``results`` is given, their entries are appended to it. Self-speculative decoding and
        ``kv: none`` never take joins."""
        exit_config = exit_config or ExitConfig()
        params = self._sampling_list(sampling, len(prompts))
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token", "pass non-empty prompts")
        policy = exit_config.build_policy(self.L)
        with torch.inference_mode():
            if exit_config.policy == "self-speculative":
                if any(p.temperature > 0 for p in params):
                    raise ConfigError("self-speculative decoding is lossless only for greedy decoding",
                                      "use temperature 0 with policy self-speculative")
                from layerexit.engine.speculative import stream_self_speculative

                yield from stream_self_speculative(self, prompts, policy.exit_layers[0] if policy.exit_layers
                                                   else self.L, exit_config.num_draft, params, results)
                return
            yield from self._stream_layers(prompts, policy, exit_config.kv, params, results, joiner)

    # ------------------------------------------------------------------------------------- building blocks
    def _sampling_list(self, sampling, n: int) -> list[SamplingParams]:
        if sampling is None:
            sampling = SamplingParams()
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
        if len(params) != n:
            raise ConfigError(f"{len(params)} sampling settings for {n} prompts", "pass one per prompt or one for all")
        return [p.validate() for p in params]

    def attention_mask(self, valid: torch.Tensor, q_start: int, n: int) -> torch.Tensor:
        """(B, 1, n, kv) mask for queries at positions q_start.. over keys 0..q_start+n-1."""
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
        pos = torch.arange(q_start, q_start + n, device=pad_off.device)[None, :] - pad_off[:, None]
        return pos.clamp(min=0)

    def run_layer(self, k: int, h: torch.Tensor, mask, pos: torch.Tensor, rope, cache) -> torch.Tensor:
        """Decoder layer k (1-based) on h (B, n, H)."""
        out = self.parts.layers[k - 1](
            h, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=cache is not None,
            position_embeddings=rope,
        )
        return out[0] if isinstance(out, tuple) else out

    def rope(self, h: torch.Tensor, pos: torch.Tensor):
        return self.parts.rotary(h, position_ids=pos) if self.parts.rotary is not None else None

    def propagate_kv(self, k: int, h: torch.Tensor, pos: torch.Tensor, rope, cache: ExitKVCache) -> None:
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

    def head_probs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.parts.head(self.parts.norm(h)).float()  # Shape: (n, V)
        return logits, logits.softmax(dim=-1)

    def decide(self, policy: ExitPolicy, step: int, n: int, hidden_at: Callable[[int], torch.Tensor],
               sampler: _RowSampler, generator: torch.Generator) -> _Decision:
        """Ask the policy for each of n rows; ``hidden_at(k)`` returns last-position hidden (n, H) at layer k,
        running layers as needed (monotonically). Row bookkeeping (tokens, layers, counts) lives on the CPU;
        hidden states, logits and the policy's scores on the model's device."""
        L = self.L
        dev = self.device
        layers = torch.full((n,), L, dtype=torch.long)
        heads = torch.zeros(n, dtype=torch.long)
        if not policy.uses_logits:
            # The exit layer is known before any logits: keep each row's hidden state at its exit and run the
            # LM head once for the whole batch. The head weighs ~8 layers on SmolLM2 and is memory-bound, so one
            # call for n rows costs about what one call for one row does; a call per exit layer would cost more
            # than the layers the exits save.
            exit_h = torch.empty((n, self.model.config.hidden_size), dtype=self.dtype, device=self.device)
            probes = None
            if policy.uses_hidden:
                probes = torch.zeros(n, dtype=torch.long)
                undecided = torch.ones(n, dtype=torch.bool)
                for k in policy.exit_layers:
                    rows = undecided.nonzero().squeeze(1)
                    h = hidden_at(k)[rows.to(dev)]
                    ex, _score = policy.should_exit_hidden(k, self.parts.norm(h))
                    ex = ex.cpu()
                    probes[rows] += 1
                    exit_h[rows[ex].to(dev)] = h[ex.to(dev)]
                    layers[rows[ex]] = k
                    undecided[rows[ex]] = False
                    if not undecided.any():
                        break
                if undecided.any():
                    rest = undecided.nonzero().squeeze(1).to(dev)
                    exit_h[rest] = hidden_at(L)[rest]
            else:
                layers = policy.choose_layers(n, step, generator)
                for k in sorted(set(layers.tolist())):
                    rows = (layers == k).nonzero().squeeze(1).to(dev)
                    exit_h[rows] = hidden_at(k)[rows]
            logits, probs = self.head_probs(exit_h)
            heads += 1
            all_rows = torch.arange(n)
            return _Decision(sampler.pick(all_rows, logits, probs), layers, probs.max(dim=-1).values.cpu(), heads,
                             probes)
        tokens = torch.zeros(n, dtype=torch.long)
        conf = torch.zeros(n)
        undecided = torch.ones(n, dtype=torch.bool)
        for k in [*policy.exit_layers, L]:
            rows = undecided.nonzero().squeeze(1)
            logits, probs = self.head_probs(hidden_at(k)[rows.to(dev)])
            heads[rows] += 1
            ex = torch.ones(len(rows), dtype=torch.bool) if k == L else policy.should_exit(k, probs).cpu()
            if ex.any():
                sel = rows[ex]
                on = ex.to(dev)
                tokens[sel] = sampler.pick(sel, logits[on], probs[on])
                conf[sel] = probs[on].max(dim=-1).values.cpu()
                layers[sel] = k
                undecided[sel] = False
            if not undecided.any():
                return _Decision(tokens, layers, conf, heads)
        raise AssertionError("unreachable: the final layer always decides")

    # ------------------------------------------------------------------------------------------ the loop
    def _open_rows(self, prompts, params: list[SamplingParams], policy: ExitPolicy, kv: str, q_start: int,
                   width: int, first_index: int, step: int, generator: torch.Generator,
                   results: list[SequenceResult] | None):
        """New rows whose prompts end at position q_start + P - 1 (left-padded to P = longest prompt), in
        buffers ``width`` positions wide: the prefill and the first token's decision.
        Returns (rows, sampler, decision, layer_flops, full_cost)."""
        B = len(prompts)
        dev = self.device
        ids, mask = pad_left(prompts, self.pad)
        ids, mask = ids.to(dev), mask.to(dev)
        P = ids.shape[1]
        valid = torch.zeros((B, width), dtype=torch.bool, device=dev)
        valid[:, q_start : q_start + P] = mask.bool()
        tokens = torch.full((B, width), self.pad, dtype=torch.long, device=dev)
        tokens[:, q_start : q_start + P] = ids
        pad_off = q_start + (mask == 0).sum(dim=1)
        cache = deep_h = None
        if kv != "none":
            cache = ExitKVCache(self.L, B, width, self.kv_heads, self.head_dim, self.dtype, dev)
            cache.lengths = [q_start] * self.L  # positions before the prompt are masked out: never read
            deep_h = torch.zeros((B, width, self.model.config.hidden_size), dtype=self.dtype, device=dev)
        rows = _Rows(tokens, valid, pad_off, torch.arange(first_index, first_index + B),
                     torch.zeros(B, dtype=torch.long), cache, deep_h)
        sampler = _RowSampler(params)
        F = self.flops
        if kv == "none":
            # No cache: the first token is one pass over the prompt, up to its exit layer, like every other.
            dec, layer_flops, full_cost = self._step_nocache(policy, step, tokens, valid, pad_off, q_start + P - 1,
                                                             sampler, generator)
            return rows, sampler, dec, layer_flops, torch.full((B,), full_cost, dtype=torch.long)
        # Prefill: every layer on the prompt (identical for every policy), capturing the last position.
        h = self.parts.embed(ids)
        pos = self.positions(pad_off, q_start, P)
        rope = self.rope(h, pos)
        am = self.attention_mask(valid, q_start, P)
        captured: dict[int, torch.Tensor] = {}
        for k in range(1, self.L + 1):
            h = self.run_layer(k, h, am, pos, rope, cache)
            captured[k] = h[:, -1]
        if results is not None:
            results.extend(SequenceResult() for _ in range(first_index + B - len(results)))
            for r in range(first_index, first_index + B):
                results[r].prefill_flops = self.L * F.layer(P, P)
        dec = self.decide(policy, step, B, lambda k: captured[k], sampler, generator)
        layer_flops = torch.zeros(B, dtype=torch.long)  # the prefill already ran every layer
        return rows, sampler, dec, layer_flops, torch.full((B,), F.head(1), dtype=torch.long)

    def _stream_layers(self, prompts, policy: ExitPolicy, kv: str, params: list[SamplingParams],
                       results: list[SequenceResult] | None, joiner: "BatchJoiner | None" = None
                       ) -> Iterator[list[TokenEvent]]:
        generator = torch.Generator()
        generator.manual_seed(params[0].seed if params[0].seed is not None else 0)
        P = max(len(p) for p in prompts)
        width = P + max(p.max_new_tokens for p in params)
        batch, sampler, dec, layer_flops, full_cost = self._open_rows(prompts, params, policy, kv, 0, width, 0, 0,
                                                                      generator, results)
        next_index = len(prompts)
        self.last_cache = batch.cache  # kept for inspection (tests, debugging); replaced by the next generation
        F = self.flops
        t = P  # next position to fill
        step = 0
        while True:
            flops = layer_flops + dec.heads * F.head(1)
            if dec.probes is not None:
                flops = flops + dec.probes * F.probe(1)
            batch.counts += 1
            events = []
            finished = torch.zeros(len(batch.index), dtype=torch.bool)
            for j in range(len(batch.index)):
                tok = int(dec.tokens[j])
                p = sampler.params[j]
                reason = None
                if tok in self.eos or tok in p.stop_token_ids:
                    reason = "stop"
                elif batch.counts[j] >= p.max_new_tokens:
                    reason = "length"
                finished[j] = reason is not None
                events.append(TokenEvent(int(batch.index[j]), tok, int(dec.layers[j]), float(dec.confidence[j]),
                                         int(flops[j]), int(full_cost[j]), reason is not None, reason))
            yield events
            if joiner is not None:  # rows the caller gave up on leave now, without an event
                finished |= torch.tensor([joiner.cancelled(int(i)) for i in batch.index.tolist()], dtype=torch.bool)
            if finished.all():  # an empty batch ends; the caller starts a new one for whatever is waiting
                return
            x = dec.tokens
            if finished.any():
                keep = (~finished).nonzero().squeeze(1)
                batch.keep(keep)
                x = x[keep]
                sampler.select(keep)
            step += 1
            n = len(batch.index)
            x = x.to(self.device)
            batch.tokens[:, t] = x
            batch.valid[:, t] = True
            if kv == "none":
                dec, layer_flops, cost = self._step_nocache(policy, step, batch.tokens, batch.valid, batch.pad_off,
                                                            t, sampler, generator)
            else:
                dec, layer_flops, cost = self._step_cached(policy, step, x, batch.valid, batch.pad_off, t,
                                                           batch.cache, batch.deep_h, kv, sampler, generator)
            full_cost = torch.full((n,), cost, dtype=torch.long)
            # Continuous batching: new prompts join between steps, when every layer's cache reaches position t
            # (always with propagate; with recompute, after a step that went to full depth). Each is prefilled
            # so that its prompt ends at t, in lockstep with the rows already decoding.
            complete = batch.cache is not None and all(l == t + 1 for l in batch.cache.lengths)
            new = joiner.admit(t + 1, n) if joiner is not None and complete else []
            if new:
                new_prompts = [list(pr) for pr, _ in new]
                if any(not 0 < len(pr) <= t + 1 for pr in new_prompts):
                    raise ValueError(f"a joining prompt must have 1..{t + 1} tokens at this step")
                new_params = self._sampling_list([sp for _, sp in new], len(new))
                need = t + 1 + max(sp.max_new_tokens for sp in new_params)
                if need > batch.width:
                    batch.widen(need, self.pad)
                Pn = max(len(pr) for pr in new_prompts)
                rows, new_sampler, new_dec, new_flops, new_cost = self._open_rows(
                    new_prompts, new_params, policy, kv, t + 1 - Pn, batch.width, next_index, step, generator,
                    results)
                next_index += len(new)
                batch.extend(rows)
                sampler.extend(new_sampler)
                dec = dec.cat(new_dec)
                layer_flops = torch.cat([layer_flops, new_flops])
                full_cost = torch.cat([full_cost, new_cost])
                self.last_cache = batch.cache
            t += 1

    def _step_nocache(self, policy, step, tokens, valid, pad_off, t, sampler, generator):
        """The paper's setting: the whole prefix 0..t through the layers again, no cache."""
        T = t + 1
        F = self.flops
        h = self.parts.embed(tokens[:, :T])
        pos = self.positions(pad_off, 0, T)
        rope = self.rope(h, pos)
        am = self.attention_mask(valid, 0, T)
        state = {"depth": 0, "h": h}

        def hidden_at(k: int) -> torch.Tensor:
            while state["depth"] < k:
                state["depth"] += 1
                state["h"] = self.run_layer(state["depth"], state["h"], am, pos, rope, None)
            return state["h"][:, -1]

        dec = self.decide(policy, step, tokens.shape[0], hidden_at, sampler, generator)
        layer_flops = torch.full((tokens.shape[0],), state["depth"] * F.layer(T, T), dtype=torch.long)
        return dec, layer_flops, self.L * F.layer(T, T) + F.head(1)

    def _step_cached(self, policy, step, x, valid, pad_off, t, cache: ExitKVCache, deep_h, kv, sampler, generator):
        """One decode step for the token x at position t, with catch-up (recompute) or K/V propagation."""
        F = self.flops
        n_rows = x.shape[0]
        state = {"depth": 0, "h": self.parts.embed(x[:, None]), "start": t, "flops": 0}
        ropes: dict[int, tuple] = {}

        def hidden_at(k: int) -> torch.Tensor:
            while state["depth"] < k:
                layer = state["depth"] + 1
                c = cache.lengths[layer - 1]
                if c < state["start"]:
                    # Positions this layer has not seen join the pass with their stored hidden (depth layer-1).
                    state["h"] = torch.cat([deep_h[:, c : state["start"]], state["h"]], dim=1)
                    state["start"] = c
                start, n = state["start"], t + 1 - state["start"]
                if start not in ropes:
                    pos = self.positions(pad_off, start, n)
                    ropes[start] = (pos, self.rope(state["h"], pos), self.attention_mask(valid, start, n))
                pos, rope, am = ropes[start]
                state["h"] = self.run_layer(layer, state["h"], am, pos, rope, cache)
                state["flops"] += F.layer(n, t + 1)
                state["depth"] = layer
            return state["h"][:, -1]

        dec = self.decide(policy, step, n_rows, hidden_at, sampler, generator)
        e = state["depth"]
        if e < self.L:
            if kv == "recompute":
                deep_h[:, state["start"] : t + 1] = state["h"]
            else:  # propagate: only the current position is missing from layers e+1..L
                h_last = state["h"][:, -1:]
                pos = self.positions(pad_off, t, 1)
                rope = self.rope(h_last, pos)
                for k in range(e + 1, self.L + 1):
                    self.propagate_kv(k, h_last, pos, rope, cache)
                state["flops"] += (self.L - e) * F.kv_projection(1)
        layer_flops = torch.full((n_rows,), state["flops"], dtype=torch.long)
        return dec, layer_flops, self.L * F.layer(1, t + 1) + F.head(1)
