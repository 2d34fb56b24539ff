"""The engine's only decode loop: prefill, step, join/leave rows, compaction, stop conditions, streaming.

Early exit (every policy and KV strategy), self-speculative verification of drafts (layer, n-gram or both,
batched, each row accepting its own count) and continuous batching are modes of this one loop, sharing one
stop / mask / RoPE path.

Layout: a batch is a grid of rows x columns. Every row's tokens live in the same columns; a column a row does
not use (left padding, a rejected draft, a finished row's past) is marked invalid for that row and masked out.
RoPE positions are the running count of a row's valid columns, so holes cost nothing but their width.
Compaction drops the columns no live row uses once they are worth a copy, so a batch that keeps admitting
joiners stays as wide as its live rows' lengths, not as wide as its whole history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from layerexit.engine.cache import ExitKVCache
from layerexit.engine.drafters import ReplayDrafter, ngram_proposal
from layerexit.engine.heads import StaticVocabHead, check_vocab_size, load_draft_vocab
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.policies import ExitPolicy, FinalPolicy
from layerexit.engine.reference import pad_left
from layerexit.engine.results import SequenceResult, TokenEvent
from layerexit.engine.static import static_inputs
from layerexit.errors import ConfigError

# ``engine`` below is the EarlyExitEngine running the loop; engine/decode.py imports this module, so this one names
# that class in annotations only and never imports it (no import circle).

# Compact when at least this many columns are dead and they are at least a quarter of the width.
COMPACT_MIN_COLUMNS = 32


@dataclass
class StepOut:
    """What one step produced, per row: a list of tokens (one, or several after a verified draft)."""

    tokens: list[list[int]]
    layers: list[list[int]]
    confs: list[list[float]]
    logprobs: list[list[float] | None]
    tops: list[list[list[tuple[int, float]]] | None]
    flops: list[int]  # each row's compute this step
    full: list[int]  # what one token of that row costs at full depth
    drafted: list[int] | None = None  # self-speculative: drafts each row verified this step
    accepted: list[int] | None = None  # ... and how many of them it accepted

    def cat(self, other: "StepOut") -> "StepOut":
        def counts(out: "StepOut", name: str) -> list[int]:
            return getattr(out, name) or [0] * len(out.tokens)

        return StepOut(*(getattr(self, f) + getattr(other, f) for f in
                         ("tokens", "layers", "confs", "logprobs", "tops", "flops", "full")),
                       counts(self, "drafted") + counts(other, "drafted"),
                       counts(self, "accepted") + counts(other, "accepted"))


class _Rows:
    """Per-row state of a running batch; ``tokens``/``valid`` are (B, width) on the model's device."""

    def __init__(self, tokens, valid, index, params, generators, history, cache, deep_h) -> None:
        self.tokens, self.valid = tokens, valid
        self.index: list[int] = index
        self.params: list[SamplingParams] = params
        self.generators: list[torch.Generator] = generators
        self.history: list[list[int]] = history  # prompt + emitted tokens (n-gram drafts)
        self.counts = [0] * len(index)
        self.cache: ExitKVCache | None = cache
        self.deep_h: torch.Tensor | None = deep_h  # (B, width, H) where each position stopped (recompute)
        self.drafts: torch.Tensor | None = None  # (B, k) the next step's feature drafts, on the model's device

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return len(self.index)

    def positions(self, start: int, n: int) -> torch.Tensor:
        """RoPE positions (B, n) of columns start..start+n-1: the count of each row's valid columns before."""
        pos = self.valid[:, : start + n].long().cumsum(1) - 1
        return pos[:, start:].clamp(min=0)

    def keep(self, rows: list[int]) -> None:
        on = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        self.tokens, self.valid = self.tokens[on], self.valid[on]
        for name in ("index", "params", "generators", "history", "counts"):
            setattr(self, name, [getattr(self, name)[i] for i in rows])
        if self.cache is not None:
            self.cache.select_rows(on)
        if self.deep_h is not None:
            self.deep_h = self.deep_h[on]
        if self.drafts is not None:
            self.drafts = self.drafts[on]

    def widen(self, width: int, pad: int) -> None:
        extra = width - self.width
        if extra <= 0:
            return
        B = self.tokens.shape[0]
        self.tokens = torch.cat([self.tokens, self.tokens.new_full((B, extra), pad)], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros((B, extra))], dim=1)
        if self.cache is not None:
            self.cache.widen(width)
        if self.deep_h is not None:
            self.deep_h = torch.cat([self.deep_h, self.deep_h.new_zeros((B, extra, self.deep_h.shape[2]))], dim=1)

    def extend(self, other: "_Rows") -> None:
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.valid = torch.cat([self.valid, other.valid])
        for name in ("index", "params", "generators", "history", "counts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if self.cache is not None:
            self.cache.extend(other.cache)
        if self.deep_h is not None:
            self.deep_h = torch.cat([self.deep_h, other.deep_h])
        if self.drafts is not None:
            self.drafts = torch.cat([self.drafts, other.drafts])

    def compact(self, t: int, force: bool = False) -> int:
        """Drop the columns before ``t`` that no live row uses (finished rows' past, shared holes); returns the
        new ``t``. Positions are counts of valid columns, so they do not change; nothing live is moved."""
        dead = ~self.valid[:, :t].any(dim=0)  # Shape: (t,)
        n_dead = int(dead.sum())
        if n_dead == 0 or (not force and (n_dead < COMPACT_MIN_COLUMNS or 4 * n_dead < self.width)):
            return t
        keep = torch.cat([(~dead).nonzero().squeeze(1), torch.arange(t, self.width, device=dead.device)])
        self.tokens, self.valid = self.tokens[:, keep], self.valid[:, keep]
        if self.cache is not None:
            # A layer's cache holds columns < its length; after the drop it holds the kept ones among them.
            kept_before = torch.cumsum((~dead).long(), 0)
            lengths = [int(kept_before[l - 1]) if 0 < l <= t else (l - n_dead if l > t else 0)
                       for l in self.cache.lengths]
            self.cache.keys = [k[:, :, keep] for k in self.cache.keys]
            self.cache.values = [v[:, :, keep] for v in self.cache.values]
            self.cache.lengths = lengths
        if self.deep_h is not None:
            self.deep_h = self.deep_h[:, keep]
        return t - n_dead


def _finish(token: int, count: int, p: SamplingParams, eos: set[int]) -> str | None:
    if token in eos or token in p.stop_token_ids:
        return "stop"
    if count >= p.max_new_tokens:
        return "length"
    return None


class DecodeLoop:
    """One generation (one batch, growing and shrinking with joins and departures) under one ExitConfig."""

    def __init__(self, engine: "EarlyExitEngine", cfg: ExitConfig, params: list[SamplingParams],
                 replay: Sequence[Sequence[int]] | None = None) -> None:
        self.e = engine
        self.cfg = cfg
        self.L = engine.L
        self.F = engine.flops
        self.spec = cfg.policy == "self-speculative"
        # Feature drafts (EAGLE-3) and the free perfect draft (replay) draft k tokens every step with no target layer
        # and verify k+1 columns: ``step_features``.
        self.replay = ReplayDrafter(replay) if replay is not None and self.spec else None
        self.drafter = engine.feature_drafter() if self.spec and self.replay is None and cfg.draft == "eagle3" else None
        self.features = self.replay is not None or self.drafter is not None
        if replay is not None and not self.spec:
            raise ConfigError("a replayed draft needs policy self-speculative", "set policy self-speculative")
        if self.spec:
            if any(p.temperature > 0 for p in params):
                raise ConfigError("self-speculative decoding is lossless only for greedy decoding",
                                  "use temperature 0 with policy self-speculative")
            draft_policy = cfg.build_policy(self.L)
            self.draft_layer = min(draft_policy.exit_layers[0] if draft_policy.exit_layers else self.L, self.L)
            self.policy: ExitPolicy = FinalPolicy(self.L)
            self.kv = "recompute"  # verification keeps every layer's cache exact
            self.extra = cfg.num_draft + 1  # columns a step may add beyond one
            if self.drafter is not None:
                self.extra = 2 * cfg.num_draft + 1  # and the chained drafts' scratch columns after them
            self.draft_head = None
            if cfg.draft_vocab and not self.features:  # a feature draft has its own pruned head
                ids = load_draft_vocab(cfg.draft_vocab, vocab_size=engine.vocab)
                self.draft_head = StaticVocabHead(engine.parts, ids)
            # A decoder-layer adapter at the draft layer attends over the draft's past: its K/V live in cache
            # layers after the model's own, in the same columns (so masks, holes and compaction cover them).
            adapter = engine.parts.adapters.get(self.draft_layer) if cfg.draft in ("layer", "layer+ngram") and \
                not self.features else None
            self.draft_adapter = adapter if getattr(adapter, "attends", False) else None
            if self.draft_adapter is not None:
                self.draft_adapter.set_cache_base(self.L)
        else:
            self.policy = cfg.build_policy(self.L)
            self.kv = cfg.kv
            self.extra = 0
            self.draft_adapter = None
            attending = sorted(l for l, a in engine.parts.adapters.items() if getattr(a, "attends", False)
                               and l in self.policy.exit_layers)
            if attending:
                raise ConfigError(
                    f"policy {cfg.policy!r}: the exit adapters at layers {attending} are decoder layers, which attend "
                    "over the exit's past and so serve as drafts",
                    "use policy self-speculative (lossless) with that draft layer, or a model with MLP adapters")
        self.cache_layers = self.L + (self.draft_adapter.num_layers if self.draft_adapter is not None else 0)
        if self.drafter is not None:
            self.cache_layers = self.L + 1  # the feature draft's own K/V, at cache index L
        self.check_head = cfg.resolved_check_head()
        self.static_check = None  # check_head static: the StaticVocabHead exit checks score over
        if self.check_head == "static" and not self.spec:
            from layerexit.engine.heads import load_check_vocab

            ids = load_check_vocab(cfg.check_vocab_file, int(cfg.check_vocab), engine.vocab)
            self.static_check = StaticVocabHead(engine.parts, ids)
        self.check_k = check_vocab_size(cfg.check_vocab, engine.vocab) if self.check_head == "candidates" else None
        self.generator = torch.Generator()
        self.generator.manual_seed(params[0].seed if params[0].seed is not None else 0)

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, prompts, params, results: list[SequenceResult] | None, joiner) -> Iterator[list[TokenEvent]]:
        e = self.e
        P = max(len(p) for p in prompts)
        width = P + max(p.max_new_tokens for p in params) + self.extra
        rows, out = self.open_rows(prompts, params, 0, width, 0, 0, results)
        next_index = len(prompts)
        if e.keep_last_cache:
            e.last_cache, e.last_rows = rows.cache, rows
        t = P  # next column to fill
        step = 0
        while True:
            events, finished = self.emit(rows, out)
            yield events
            if joiner is not None:  # rows the caller gave up on leave now, without an event
                finished = [f or joiner.cancelled(i) for f, i in zip(finished, rows.index)]
            if all(finished):  # an empty batch ends; the caller starts a new one for whatever is waiting
                return
            keep = [j for j, f in enumerate(finished) if not f]
            x = [out.tokens[j][-1] for j in keep]
            if len(keep) < len(rows):
                rows.keep(keep)
            if len(keep) < len(finished) or self.spec:
                t = rows.compact(t)
            step += 1
            rows.widen(t + 1 + self.extra, e.pad)
            xt = torch.tensor(x, dtype=torch.long, device=e.device)
            if self.features:
                out, t = self.step_features(rows, xt, t)
            elif self.spec:
                out, t = self.step_speculative(rows, xt, t)
            elif self.kv == "none":
                out = self.step_nocache(rows, xt, t, step)
                t += 1
            else:
                out = self.step_cached(rows, xt, t, step)
                t += 1
            # Continuous batching: new prompts join between steps, when every layer's cache reaches column t
            # (always with propagate and self-speculative; with recompute, after a step that went to full depth).
            # Each is prefilled so that its prompt ends at column t-1, in lockstep with the rows decoding.
            complete = rows.cache is not None and all(l == t for l in rows.cache.lengths)
            new = joiner.admit(t, len(rows)) if joiner is not None and complete else []
            if new:
                new_prompts = [list(pr) for pr, _ in new]
                if any(not 0 < len(pr) <= t for pr in new_prompts):
                    raise ValueError(f"a joining prompt must have 1..{t} tokens at this step")
                new_params = e.sampling_list([sp for _, sp in new], len(new))
                if self.spec and any(p.temperature > 0 for p in new_params):
                    raise ConfigError("self-speculative decoding is lossless only for greedy decoding",
                                      "use temperature 0 with policy self-speculative")
                rows.widen(t + max(sp.max_new_tokens for sp in new_params) + self.extra, e.pad)
                Pn = max(len(pr) for pr in new_prompts)
                new_rows, new_out = self.open_rows(new_prompts, new_params, t - Pn, rows.width, next_index, step,
                                                   results)
                next_index += len(new)
                rows.extend(new_rows)
                out = out.cat(new_out)
                if e.keep_last_cache:
                    e.last_cache, e.last_rows = rows.cache, rows

    def emit(self, rows: _Rows, out: StepOut) -> tuple[list[TokenEvent], list[bool]]:
        """Token events of a step, cut at each row's stop; updates counts and histories."""
        events: list[TokenEvent] = []
        finished: list[bool] = []
        for j in range(len(rows)):
            toks = out.tokens[j]
            p = rows.params[j]
            reason = None
            n_emit = 0
            for tok in toks:
                n_emit += 1
                rows.counts[j] += 1
                reason = _finish(tok, rows.counts[j], p, self.e.eos)
                if reason is not None:
                    break
            # The step's compute is shared by the tokens it produced (the first takes the remainder).
            share, rest = divmod(out.flops[j], n_emit)
            drafted = out.drafted[j] if out.drafted is not None else 0
            accepted = out.accepted[j] if out.accepted is not None else 0
            for i in range(n_emit):
                last = i == n_emit - 1
                lp = out.logprobs[j][i] if out.logprobs[j] is not None else None
                top = out.tops[j][i] if out.tops[j] is not None else None
                events.append(TokenEvent(rows.index[j], toks[i], out.layers[j][i], out.confs[j][i],
                                         share + (rest if i == 0 else 0), out.full[j], last and reason is not None,
                                         reason if last else None, lp, top, drafted if i == 0 else 0,
                                         accepted if i == 0 else 0))
            rows.history[j].extend(toks[:n_emit])
            if reason is not None:
                out.tokens[j] = toks[:n_emit]
            finished.append(reason is not None)
        return events, finished

    # ------------------------------------------------------------------------------------------ prefill
    def open_rows(self, prompts, params: list[SamplingParams], q_start: int, width: int, first_index: int,
                  step: int, results: list[SequenceResult] | None) -> tuple[_Rows, StepOut]:
        """New rows whose prompts end at column q_start + P - 1 (left-padded to P = longest prompt), in buffers
        ``width`` columns wide: the prefill and the first token's decision."""
        e = self.e
        B = len(prompts)
        dev = e.device
        ids, mask = pad_left(prompts, e.pad)
        ids, mask = ids.to(dev), mask.to(dev)
        P = ids.shape[1]
        valid = torch.zeros((B, width), dtype=torch.bool, device=dev)
        valid[:, q_start : q_start + P] = mask.bool()
        tokens = torch.full((B, width), e.pad, dtype=torch.long, device=dev)
        tokens[:, q_start : q_start + P] = ids
        cache = deep_h = None
        if self.kv != "none":
            cache = ExitKVCache(self.cache_layers, B, width, e.kv_heads, e.head_dim, e.dtype, dev)
            cache.lengths = [q_start] * self.cache_layers  # columns before the prompt are masked out: never read
            if self.kv == "recompute" and not self.spec:
                deep_h = torch.zeros((B, width, e.model.config.hidden_size), dtype=e.dtype, device=dev)
        generators = []
        for p in params:
            g = torch.Generator(device=dev)  # sampling stays on the model's device
            g.manual_seed(p.seed if p.seed is not None else int(torch.seed() % (2**63)))
            generators.append(g)
        rows = _Rows(tokens, valid, list(range(first_index, first_index + B)), list(params), generators,
                     [list(p) for p in prompts], cache, deep_h)
        if results is not None:
            results.extend(SequenceResult() for _ in range(first_index + B - len(results)))
        F = self.F
        if self.kv == "none":
            # No cache: the first token is one pass over the prompt, up to its exit layer, like every other.
            out = self._nocache_pass(rows, q_start + P - 1, step)
            return rows, out
        # Prefill: every layer on the prompt (identical for every policy), capturing the last position.
        h = e.parts.embed(ids)
        pos = rows.positions(q_start, P)
        rope = e.rope(h, pos)
        am = e.attention_mask(valid, q_start, P)
        captured: dict[int, torch.Tensor] = {}
        aux: dict[int, torch.Tensor] = {}  # a feature draft's inputs: whole hidden states at its aux layers
        for k in range(1, self.L + 1):
            h = e.run_layer(k, h, am, pos, rope, cache)
            captured[k] = h[:, -1]
            if self.drafter is not None and k in self.drafter.aux:
                aux[k] = h
            if self.draft_adapter is not None and k == self.draft_layer:
                self.draft_adapter.step(h, am, pos, rope, cache)  # the draft adapter's K/V of the prompt
        if results is not None:
            depth = self.cache_layers  # the model's layers and the draft adapter's
            for r in range(first_index, first_index + B):
                results[r].prefill_flops = depth * F.layer(P, q_start + P)
        dec = self.decide(self.policy, step, B, lambda k: captured[k], rows)
        if self.drafter is not None:
            # The draft over the prompt (from the target's features, the last column reading the first token) and
            # the first step's chained drafts; priced with the prefill.
            s = static_inputs(e, h, valid, pos, q_start, rope=rope)
            rows.drafts, draft_flops = self.drafter.start(e, rows, aux, s, dec.tokens.to(dev), q_start,
                                                          self.cfg.num_draft)
            if results is not None:
                for r in range(first_index, first_index + B):
                    results[r].prefill_flops += draft_flops
        full = F.head(1)
        # The prefill already ran every layer: the first token costs its checks and head only.
        return rows, dec.to_out(rows, [0] * B, [full] * B)

    # ------------------------------------------------------------------------------------------ steps
    def _nocache_pass(self, rows: _Rows, t: int, step: int) -> StepOut:
        """The paper's setting: the whole prefix 0..t through the layers again, no cache."""
        e, F = self.e, self.F
        T = t + 1
        h = e.parts.embed(rows.tokens[:, :T])
        pos = rows.positions(0, T)
        rope = e.rope(h, pos)
        am = e.attention_mask(rows.valid, 0, T)
        state = {"depth": 0, "h": h}

        def hidden_at(k: int) -> torch.Tensor:
            while state["depth"] < k:
                state["depth"] += 1
                state["h"] = e.run_layer(state["depth"], state["h"], am, pos, rope, None)
            return state["h"][:, -1]

        dec = self.decide(self.policy, step, len(rows), hidden_at, rows)
        n = len(rows)
        return dec.to_out(rows, [state["depth"] * F.layer(T, T)] * n, [self.L * F.layer(T, T) + F.head(1)] * n)

    def step_nocache(self, rows: _Rows, x: torch.Tensor, t: int, step: int) -> StepOut:
        rows.tokens[:, t] = x
        rows.valid[:, t] = True
        return self._nocache_pass(rows, t, step)

    def step_cached(self, rows: _Rows, x: torch.Tensor, t: int, step: int) -> StepOut:
        """One decode step for the token x at column t, with catch-up (recompute) or K/V propagation."""
        e, F = self.e, self.F
        cache, deep_h = rows.cache, rows.deep_h
        rows.tokens[:, t] = x
        rows.valid[:, t] = True
        state = {"depth": 0, "h": e.parts.embed(x[:, None]), "start": t, "flops": 0}
        ropes: dict[int, tuple] = {}
        compiled = e.compiled if e.compiled is not None and e.compiled.active else None
        static: list = []  # the compiled step's shared inputs, made on first use

        def hidden_at(k: int) -> torch.Tensor:
            if compiled is not None and state["start"] == t and state["depth"] < k:
                # One new column through layers already at length t: the static-shape compiled segment.
                if not static:
                    static.append(compiled.step_inputs(state["h"], rows.valid, rows.positions(t, 1), t))
                h, reached = compiled.run(state["depth"] + 1, k, state["h"], static[0], cache, t)
                state["flops"] += (reached - state["depth"]) * F.layer(1, t + 1)
                state["h"], state["depth"] = h, reached
            while state["depth"] < k:
                layer = state["depth"] + 1
                c = cache.lengths[layer - 1]
                if c < state["start"]:
                    # Columns this layer has not seen join the pass with their stored hidden (depth layer-1).
                    state["h"] = torch.cat([deep_h[:, c : state["start"]], state["h"]], dim=1)
                    state["start"] = c
                start, n = state["start"], t + 1 - state["start"]
                if start not in ropes:
                    pos = rows.positions(start, n)
                    ropes[start] = (pos, e.rope(state["h"], pos), e.attention_mask(rows.valid, start, n))
                pos, rope, am = ropes[start]
                state["h"] = e.run_layer(layer, state["h"], am, pos, rope, cache)
                state["flops"] += F.layer(n, t + 1)
                state["depth"] = layer
            return state["h"][:, -1]

        dec = self.decide(self.policy, step, len(rows), hidden_at, rows)
        depth = state["depth"]
        if depth < self.L:
            if self.kv == "recompute":
                deep_h[:, state["start"] : t + 1] = state["h"]
            else:  # propagate: only the current column is missing from layers depth+1..L
                h_last = state["h"][:, -1:]
                pos = rows.positions(t, 1)
                rope = e.rope(h_last, pos)
                for k in range(depth + 1, self.L + 1):
                    e.propagate_kv(k, h_last, pos, rope, cache)
                state["flops"] += (self.L - depth) * F.kv_projection(1)
        n = len(rows)
        return dec.to_out(rows, [state["flops"]] * n, [self.L * F.layer(1, t + 1) + F.head(1)] * n)

    def _run(self, rows: _Rows, first: int, last: int, h: torch.Tensor, start: int, s=None,
             capture: Sequence[int] = (), captured: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Layers first..last on h (B, n, H) at columns start..start+n-1, through the cache; the hidden states after
        the layers in ``capture`` go into ``captured``. ``s``: the pass's ``StepInputs`` when the caller has them."""
        e = self.e
        n = h.shape[1]
        if e.compiled is not None and e.compiled.active:
            # A layer draft's single column or the verification of k+1 columns: the compiled segment.
            if s is None:
                s = e.compiled.step_inputs(h, rows.valid, rows.positions(start, n), start)
            h, reached = e.compiled.run(first, last, h, s, rows.cache, start, capture, captured)
            if reached == last:
                return h
            first = reached + 1
        pos = rows.positions(start, n)
        rope = (s.cos, s.sin) if s is not None else e.rope(h, pos)
        am = e.attention_mask(rows.valid, start, n)
        for k in range(first, last + 1):
            h = e.run_layer(k, h, am, pos, rope, rows.cache)
            if captured is not None and k in capture:
                captured[k] = h
        return h

    def _adapt(self, rows: _Rows, h: torch.Tensor, start: int) -> torch.Tensor:
        """The draft's decoder-layer adapter on h (B, n, H) at columns start..start+n-1, through its cache."""
        n = h.shape[1]
        pos = rows.positions(start, n)
        return self.draft_adapter.step(h, self.e.attention_mask(rows.valid, start, n), pos, self.e.rope(h, pos),
                                       rows.cache)

    def step_features(self, rows: _Rows, x: torch.Tensor, t: int) -> tuple[StepOut, int]:
        """Feature drafts (EAGLE-3) or the replayed answer: verify x and k drafts at columns t..t+k in one pass of
        every layer (compiled when the engine is), capturing the draft's aux features on the way; keep each row's
        accepted prefix (the rest become holes in every cache layer, the draft's included), then draft the next
        step's k tokens from the verified features. Always k+1 columns: one shape per batch for the whole run."""
        e, F, L, k = self.e, self.F, self.L, self.cfg.num_draft
        B = len(rows)
        dev = e.device
        room = [max(0, p.max_new_tokens - c - 1) for p, c in zip(rows.params, rows.counts)]  # drafts a row can use
        if self.replay is not None:
            proposals, lengths = self.replay.propose(rows.index, rows.counts, k, e.pad)
            drafts = torch.tensor(proposals, dtype=torch.long, device=dev)
            row_len = [min(r, n) for r, n in zip(room, lengths)]
        else:
            drafts = rows.drafts
            row_len = [min(k, r) for r in room]
        cols = torch.cat([x[:, None], drafts], dim=1)  # Shape: (B, k+1)
        rows.tokens[:, t : t + k + 1] = cols
        rows.valid[:, t : t + k + 1] = True
        h = e.parts.embed(cols)
        s = static_inputs(e, h, rows.valid, rows.positions(t, k + 1), t)
        captured: dict[int, torch.Tensor] = {}
        # A replayed draft needs no features; it captures the engine's feature draft's layers all the same when one is
        # loaded, so both run one compiled verification graph (a 30-layer graph compiles in ~45 s on a CPU).
        drafter = self.drafter or (e._feature_drafter if self.replay is not None else None)
        hv = self._run(rows, 1, L, h, t, s=s, capture=drafter.aux if drafter is not None else (), captured=captured)
        flops = L * F.layer(k + 1, t + k + 1)
        logits = e.full_head.logits(hv.reshape(B * (k + 1), -1), L).view(B, k + 1, -1)
        flops += e.full_head.flops(k + 1, L)
        conf_v, preds = logits.softmax(-1).max(-1)  # Shape: (B, k+1)
        # One transfer for every row and position (token ids < 2**24 are exact in float32).
        packed = torch.cat([preds.to(conf_v.dtype), conf_v, drafts.to(conf_v.dtype)], dim=1).cpu()
        preds_c, conf_c, drafts_c = (packed[:, : k + 1].long(), packed[:, k + 1 : 2 * k + 2],
                                     packed[:, 2 * k + 2 :].long())
        tokens, layers, confs, lps, tops, accepted = [], [], [], [], [], []
        for j in range(B):
            a = 0
            while a < row_len[j] and int(drafts_c[j, a]) == int(preds_c[j, a]):
                a += 1
            accepted.append(a)
            tokens.append([*drafts_c[j, :a].tolist(), int(preds_c[j, a])])
            layers.append([L] * (a + 1))  # every token is the final layer's (verified)
            confs.append(conf_c[j, : a + 1].tolist())
            lp, top = _verified_logprobs(rows.params[j], logits[j, : a + 1], tokens[j])
            lps.append(lp)
            tops.append(top)
        acc = torch.tensor(accepted, dtype=torch.long, device=dev)
        # Rejected columns become holes in every layer's cache (target and draft): masked out from now on.
        rows.valid[:, t + 1 : t + k + 1] &= torch.arange(k, device=dev)[None] < acc[:, None]
        if self.drafter is not None:
            bonus = preds.gather(1, acc[:, None]).squeeze(1)  # each row's next token, on the device
            rows.drafts, draft_flops = self.drafter.update(e, rows, captured, s, t, drafts, acc, bonus)
            flops += draft_flops
        full = L * F.layer(1, t + 1) + F.head(1)
        return (StepOut(tokens, layers, confs, lps, tops, [flops] * B, [full] * B, [min(k, n) for n in row_len],
                        accepted), t + k + 1)

    def step_speculative(self, rows: _Rows, x: torch.Tensor, t: int) -> tuple[StepOut, int]:
        """Draft (layer and/or n-gram), verify at the final layer in one pass, keep each row's accepted prefix.
        Returns the step's tokens and the next free column."""
        e, F, L, cfg = self.e, self.F, self.L, self.cfg
        B = len(rows)
        room = [max(0, p.max_new_tokens - c - 1) for p, c in zip(rows.params, rows.counts)]  # drafts a row can use
        kmax = min(cfg.num_draft, max(room))
        proposals = None
        if cfg.draft in ("ngram", "layer+ngram") and kmax > 0:
            proposals = [ngram_proposal(rows.history[j], min(kmax, room[j])) for j in range(B)]
        use_ngram = proposals is not None and (cfg.draft == "ngram" or all(proposals))
        flops = 0
        if use_ngram or kmax == 0 or cfg.draft == "ngram":
            # Prompt lookup: the proposals go through every layer with the last token; no early layer drafts.
            d = 0
            props = proposals if use_ngram else [[] for _ in range(B)]
            k = max((len(p) for p in props), default=0)
            row_len = [len(p) for p in props]
            drafts = torch.full((B, k), e.pad, dtype=torch.long)
            for j, p in enumerate(props):
                if p:
                    drafts[j, : len(p)] = torch.tensor(p, dtype=torch.long)
            cols = torch.cat([x[:, None], drafts.to(e.device)], dim=1)
            rows.tokens[:, t : t + k + 1] = cols
            rows.valid[:, t : t + k + 1] = True
            if self.draft_adapter is None:
                hv = self._run(rows, 1, L, e.parts.embed(cols), t)
            else:  # the draft adapter's cache must cover these columns too
                dl = self.draft_layer
                hv = self._run(rows, 1, dl, e.parts.embed(cols), t)
                self._adapt(rows, hv, t)
                hv = self._run(rows, dl + 1, L, hv, t)
                flops += self.draft_adapter.num_layers * F.layer(k + 1, t + k + 1)
            flops += L * F.layer(k + 1, t + k + 1)
            draft_layer_of_token = L  # accepted n-gram tokens equal the final layer's
        else:
            d = self.draft_layer
            row_len = [min(kmax, r) for r in room]
            hs = []
            drafts_list = []
            cur = x
            for i in range(kmax + 1):
                rows.tokens[:, t + i] = cur
                rows.valid[:, t + i] = True
                h = self._run(rows, 1, d, e.parts.embed(cur[:, None]), t + i)
                flops += d * F.layer(1, t + i + 1)
                hs.append(h)
                head_in, head_layer = h[:, -1], d
                if self.draft_adapter is not None:
                    # Every drafted column enters the adapter's cache (the last one too: it may be accepted).
                    head_in, head_layer = self._adapt(rows, h, t + i)[:, -1], None
                    flops += self.draft_adapter.num_layers * F.layer(1, t + i + 1)
                if i == kmax:
                    break
                if self.draft_head is not None:
                    logits = self.draft_head.logits(head_in, head_layer)
                    flops += self.draft_head.flops(1, head_layer)
                    probs = logits.softmax(-1)
                    conf, arg = probs.max(-1)
                    tok = self.draft_head.ids[arg]
                else:
                    logits = e.full_head.logits(head_in, head_layer)
                    flops += e.full_head.flops(1, head_layer)
                    conf, tok = logits.softmax(-1).max(-1)
                if proposals is not None:  # layer+ngram: a row's n-gram tokens come before its layer draft
                    for j, p in enumerate(proposals):
                        if i < len(p):
                            tok[j] = p[i]
                            conf[j] = 1.0
                drafts_list.append(tok)
                cur = tok
                if cfg.draft_stop is not None:
                    low = (conf < cfg.draft_stop).tolist()
                    for j in range(B):
                        if low[j]:
                            row_len[j] = min(row_len[j], i)
                    if all(rl <= i for rl in row_len):
                        break  # no row drafts further: verify what we have
            k = len(hs) - 1
            drafts = torch.stack(drafts_list[:k], dim=1).cpu() if k else torch.zeros((B, 0), dtype=torch.long)
            hv = torch.cat(hs, dim=1)
            if d < L:
                hv = self._run(rows, d + 1, L, hv, t)
                flops += (L - d) * F.layer(k + 1, t + k + 1)
            draft_layer_of_token = d
        # Verification: the final layer's logits at every drafted column (one host sync for all rows).
        logits = e.full_head.logits(hv.reshape(B * (k + 1), -1), L).view(B, k + 1, -1)
        flops += e.full_head.flops(k + 1, L)
        probs = logits.softmax(-1)
        conf_v, preds = probs.max(-1)
        packed = torch.stack([preds.to(conf_v.dtype), conf_v]).cpu()  # one transfer for every row and position
        preds, conf_v = packed[0].long(), packed[1]
        tokens, layers, confs, lps, tops, accepted = [], [], [], [], [], []
        for j in range(B):
            a = 0
            while a < row_len[j] and a < k and int(drafts[j, a]) == int(preds[j, a]):
                a += 1
            accepted.append(a)
            tokens.append([*drafts[j, :a].tolist(), int(preds[j, a])])
            layers.append([draft_layer_of_token] * a + [L])
            confs.append(conf_v[j, : a + 1].tolist())
            if a < k:  # rejected columns become holes
                rows.valid[j, t + a + 1 : t + k + 1] = False
            lp, top = _verified_logprobs(rows.params[j], logits[j, : a + 1], tokens[j])
            lps.append(lp)
            tops.append(top)
        full = L * F.layer(1, t + 1) + F.head(1)
        return (StepOut(tokens, layers, confs, lps, tops, [flops] * B, [full] * B, [min(k, n) for n in row_len],
                        accepted), t + k + 1)

    # ------------------------------------------------------------------------------------------ decisions
    def decide(self, policy: ExitPolicy, step: int, n: int, hidden_at: Callable[[int], torch.Tensor],
               rows: _Rows) -> "_Decision":
        """Ask the policy for each of n rows; ``hidden_at(k)`` returns last-position hidden (n, H) at layer k,
        running layers as needed (monotonically). Hidden states, logits and scores stay on the model's device;
        row bookkeeping (layers, FLOPs) on the CPU."""
        e, L = self.e, self.L
        dev = e.device
        layers = torch.full((n,), L, dtype=torch.long)
        extra = torch.zeros(n, dtype=torch.long)  # head / probe / adapter FLOPs per row
        if not policy.uses_logits:
            # The exit layer is known before any logits: keep each row's hidden state at its exit and run the
            # LM head once for the whole batch. The head weighs ~8 layers on SmolLM2 and is memory-bound, so one
            # call for n rows costs about what one call for one row does.
            exit_h = torch.empty((n, e.model.config.hidden_size), dtype=e.dtype, device=dev)
            if policy.uses_hidden:
                undecided = torch.ones(n, dtype=torch.bool)
                for k in policy.exit_layers:
                    idx = undecided.nonzero().squeeze(1)
                    h = hidden_at(k)[idx.to(dev)]
                    ex, _score = policy.should_exit_hidden(k, e.normed(k, h))
                    ex = ex.cpu()
                    extra[idx] += self.F.probe(1) + e.adapter_flops(k, 1)
                    exit_h[idx[ex].to(dev)] = h[ex.to(dev)]
                    layers[idx[ex]] = k
                    undecided[idx[ex]] = False
                    if not undecided.any():
                        break
                if undecided.any():
                    rest = undecided.nonzero().squeeze(1).to(dev)
                    exit_h[rest] = hidden_at(L)[rest]
            else:
                layers = policy.choose_layers(n, step, self.generator)
                for k in sorted(set(layers.tolist())):
                    idx = (layers == k).nonzero().squeeze(1).to(dev)
                    exit_h[idx] = hidden_at(k)[idx]
            # One head call for the whole batch; adapters (per exit layer) first.
            if e.parts.adapters:
                for k in sorted(set(layers.tolist())):
                    if k in e.parts.adapters:
                        idx = (layers == k).nonzero().squeeze(1).to(dev)
                        exit_h[idx] = e.parts.adapters[k](exit_h[idx])
                        extra[layers == k] += e.adapter_flops(k, 1)
            logits = e.parts.head(e.parts.norm(exit_h)).float()  # Shape: (n, V)
            extra += e.full_head.flops(1, L)
            all_rows = list(range(n))
            toks, conf = self.pick(rows, all_rows, logits, None)
            dec = _Decision(toks, layers, conf, extra)
            dec.logprob_rows(rows, all_rows, logits, None, self)
            return dec
        if self.static_check is not None:
            return self.decide_static(policy, n, hidden_at, rows)
        # Logit-based checks, each row until it exits. With check_vocab K, the first check computes full logits
        # and keeps each row's top-K candidates; later checks (and the exit token) score those K rows only.
        K = self.check_k
        tokens = torch.zeros(n, dtype=torch.long)
        conf = torch.zeros(n)
        dec = _Decision(tokens, layers, conf, extra)
        undecided = torch.ones(n, dtype=torch.bool)
        cand = None  # (n, K) on the device
        for k in [*policy.exit_layers, L]:
            idx = undecided.nonzero().squeeze(1)
            on = idx.to(dev)
            h = hidden_at(k)[on]
            if cand is None:
                logits = e.full_head.logits(h, k)  # Shape: (m, V)
                extra[idx] += e.full_head.flops(1, k)
                full_logits = logits
                ids = None
                if K is not None and k < L:
                    cand = torch.full((n, K), 0, dtype=torch.long, device=dev)
                    cand[on] = logits.topk(K, dim=-1).indices
            else:
                ids = cand[on]
                logits = e.candidate_head.logits(h, k, ids)  # Shape: (m, K)
                extra[idx] += e.candidate_head.flops(1, K, k)
                full_logits = None
            probs = logits.softmax(dim=-1)
            ex = torch.ones(len(idx), dtype=torch.bool) if k == L else policy.should_exit(k, probs).cpu()
            if ex.any():
                sel = idx[ex].tolist()
                exon = ex.to(dev)
                toks, cf = self.pick(rows, sel, logits[exon], None if ids is None else ids[exon])
                tokens[idx[ex]] = toks
                conf[idx[ex]] = cf
                layers[idx[ex]] = k
                undecided[idx[ex]] = False
                dec.logprob_rows(rows, sel, None if full_logits is None else full_logits[exon],
                                 h[exon], self, layer=k)
            if not undecided.any():
                return dec
        raise AssertionError("unreachable: the final layer always decides")

    def decide_static(self, policy: ExitPolicy, n: int, hidden_at: Callable[[int], torch.Tensor], rows: _Rows
                      ) -> "_Decision":
        """Checks over the static check vocabulary (N rows of the head): each intermediate check costs the exit's
        adapter + 2*H*N FLOPs; the rows that exit take their token (and confidence, log-probs) from the full head
        at that layer, the full head's argmax there; the rest go on, and the final layer is a full head."""
        e, L = self.e, self.L
        dev = e.device
        static = self.static_check
        layers = torch.full((n,), L, dtype=torch.long)
        extra = torch.zeros(n, dtype=torch.long)
        tokens = torch.zeros(n, dtype=torch.long)
        conf = torch.zeros(n)
        dec = _Decision(tokens, layers, conf, extra)
        undecided = torch.ones(n, dtype=torch.bool)
        for k in [*policy.exit_layers, L]:
            idx = undecided.nonzero().squeeze(1)
            h = hidden_at(k)[idx.to(dev)]
            if k == L:
                ex = torch.ones(len(idx), dtype=torch.bool)
                x_ex = e.normed(L, h)
                extra[idx] += e.adapter_flops(L, 1)
            else:
                x = e.normed(k, h)  # Shape: (m, H), through the exit's adapter
                extra[idx] += e.adapter_flops(k, 1) + 2 * static.hidden * len(static.ids)
                ex = policy.should_exit(k, static.scores(x).softmax(dim=-1)).cpu()
                if not ex.any():
                    continue
                x_ex = x[ex.to(dev)]
            full = e.parts.head(x_ex).float()  # Shape: (m_exit, V): the exiting rows' token from the full head
            sel_idx = idx[ex]
            extra[sel_idx] += 2 * static.hidden * e.vocab
            sel = sel_idx.tolist()
            toks, cf = self.pick(rows, sel, full, None)
            tokens[sel_idx] = toks
            conf[sel_idx] = cf
            layers[sel_idx] = k
            undecided[sel_idx] = False
            dec.logprob_rows(rows, sel, full, None, self, layer=k)
            if not undecided.any():
                return dec
        raise AssertionError("unreachable: the final layer always decides")

    def pick(self, rows: _Rows, sel: list[int], logits: torch.Tensor, ids: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy or temperature/top-p sampling for batch rows ``sel``, on the model's device (each row with its
        own seeded generator); ``ids`` maps candidate columns to token ids. Returns CPU (tokens, confidence)."""
        # Shape: logits (m, X) -> tokens (m,), confidence (m,)
        probs = logits.softmax(dim=-1)
        conf, arg = probs.max(dim=-1)
        for j, r in enumerate(sel):
            p = rows.params[r]
            if p.temperature <= 0:
                continue
            dist = torch.softmax(logits[j] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = dist.sort(descending=True)
                cut = sorted_p.cumsum(0) - sorted_p > p.top_p
                sorted_p[cut] = 0.0
                dist = torch.zeros_like(dist).scatter_(0, order, sorted_p)
            arg[j] = torch.multinomial(dist / dist.sum(), 1, generator=rows.generators[r])[0]
        toks = arg if ids is None else ids.gather(1, arg[:, None]).squeeze(1)
        # One device-to-host transfer for both (token ids < 2**24 are exact in float32).
        packed = torch.stack([toks.to(conf.dtype), conf]).cpu()
        return packed[0].long(), packed[1]


@dataclass
class _Decision:
    tokens: torch.Tensor  # (n,) CPU
    layers: torch.Tensor  # (n,)
    confidence: torch.Tensor  # (n,)
    extra: torch.Tensor  # (n,) head / probe FLOPs per row
    logprobs: dict | None = None  # row -> (logprob, top)

    def logprob_rows(self, rows: _Rows, sel: list[int], full_logits: torch.Tensor | None, h: torch.Tensor | None,
                     loop: DecodeLoop, layer: int | None = None) -> None:
        """Log-probs for the rows in ``sel`` that asked: from the exit layer's full logits (computed here only when
        the check used a candidate set, and priced in the row's FLOPs)."""
        asked = [(j, r) for j, r in enumerate(sel) if rows.params[r].logprobs is not None]
        if not asked:
            return
        pick = torch.tensor([j for j, _ in asked], dtype=torch.long, device=loop.e.device)
        if full_logits is None:
            full_logits = loop.e.full_head.logits(h[pick], layer)
            for _, r in asked:
                self.extra[r] += loop.e.full_head.flops(1, layer)
        else:
            full_logits = full_logits[pick]
        chosen = self.tokens[[r for _, r in asked]].to(full_logits.device)
        self.logprobs = self.logprobs or {}
        for i, (_, r) in enumerate(asked):
            lp, top = _logprobs(full_logits[i : i + 1], chosen[i : i + 1], rows.params[r].logprobs)
            self.logprobs[r] = (lp[0], top[0])

    def to_out(self, rows: _Rows, layer_flops: Sequence[int], full: Sequence[int]) -> StepOut:
        n = len(self.tokens)
        lp = self.logprobs or {}
        return StepOut(
            [[t] for t in self.tokens.tolist()], [[l] for l in self.layers.tolist()],
            [[c] for c in self.confidence.tolist()],
            [[lp[r][0]] if r in lp else None for r in range(n)], [[lp[r][1]] if r in lp else None for r in range(n)],
            [int(f) + int(x) for f, x in zip(layer_flops, self.extra.tolist())], list(full))


def _verified_logprobs(p: SamplingParams, logits: torch.Tensor, tokens: list[int]
                       ) -> tuple[list[float] | None, list[list[tuple[int, float]]] | None]:
    """A verification step's log-probs for one row (its accepted drafts and the bonus token), when it asked."""
    if p.logprobs is None:
        return None, None
    return _logprobs(logits, torch.tensor(tokens, device=logits.device), p.logprobs)


def _logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_k: int
              ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-softmax of each position's chosen token and its top-k alternatives (raw logits, no temperature)."""
    # Shape: logits (m, V), chosen (m,) -> m floats, m lists of k pairs
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen[:, None]).squeeze(1).cpu().tolist()
    if top_k == 0:
        return picked, [[] for _ in picked]
    vals, idx = logp.topk(top_k, dim=-1)
    tops = [list(zip(i, v)) for i, v in zip(idx.cpu().tolist(), vals.cpu().tolist())]
    return picked, tops
