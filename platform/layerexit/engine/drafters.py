"""Where self-speculative draft tokens come from, and when a draft stops.

- ``layer``: greedy tokens of a shallow exit (layers 1..d, through the exit's adapter when the model has one,
  optionally scored over a static draft vocabulary). Its hidden states and cache are reused by verification,
  which runs only layers d+1..L.
- ``ngram`` (prompt lookup): the tokens that followed the latest earlier occurrence of the sequence's last
  n-gram (n = ``max_ngram`` .. 1) in the prompt or the answer so far. Costs no model FLOPs; pays where answers
  quote the prompt (rewrites, extraction, code edits). Verification then runs layers 1..L.
- ``layer+ngram``: a step uses the n-gram proposal when every row of the batch has one, else the layer draft.
- ``eagle3``: a feature draft (``models/eagle3.py``): one decoder layer over the target's own hidden states at a low,
  a middle and a high layer of the verified prefix (captured during verification, no extra target layer) and the
  next token's embedding, chained k times through its own hidden state, with its own K/V cache
  (``FeatureDrafter``). The model ships it as ``eagle3/`` beside its weights (``find_eagle3``).
- the free perfect draft (``ReplayDrafter``, bench only): the final layer's own answer replayed at no cost, so a
  run shows the loop's own ceiling for k.

Draft length: ``num_draft`` tokens (feature drafts always draft k: static shapes), or, with ``draft_stop`` set,
fewer: a layer draft stops at the first token
whose draft probability is below ``draft_stop`` (Kangaroo / LayerSkip's dynamic length). Verification keeps
the output equal to the final layer's greedy tokens whatever the draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from layerexit.engine.static import StepInputs, _Spec, draft_layer

if TYPE_CHECKING:
    from pathlib import Path

DRAFT_SOURCES = ("layer", "ngram", "layer+ngram", "eagle3")


def ngram_proposal(history: Sequence[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier match of the history's last n-gram."""
    n_hist = len(history)
    if max_tokens <= 0 or n_hist < 2:
        return []
    for n in range(min(max_ngram, n_hist - 1), 0, -1):
        tail = list(history[n_hist - n :])
        # Latest earlier occurrence first: recent context predicts best.
        for start in range(n_hist - n - 1, -1, -1):
            if list(history[start : start + n]) == tail:
                follow = list(history[start + n : start + n + max_tokens])
                if follow:
                    return follow
    return []


# -- feature drafts (EAGLE-3) and the free perfect draft ---------------------------------------------------------
EAGLE3_DIR = "eagle3"  # where a model directory ships its EAGLE-3 draft (vLLM layout, ``models/eagle3.py``)


def find_eagle3(model) -> "Path | None":
    """The EAGLE-3 draft directory a loaded model ships beside its weights (``<model dir>/eagle3``), or None."""
    from pathlib import Path

    from layerexit.models.eagle3 import is_eagle3_dir

    root = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    path = Path(str(root)) / EAGLE3_DIR if root else None
    return path if path is not None and is_eagle3_dir(path) else None


class FeatureDrafter:
    """An EAGLE-3 draft inside the engine's decode loop, with its own K/V in the loop's cache (one more layer after
    the model's, in the same columns: masks, holes, compaction and joining rows cover it).

    The draft entry at column c reads the target's aux features of column c and the embedding of the token at the
    row's next valid column, and predicts the token after that (``models/eagle3.py``'s convention). Per step:

    1. verification runs the target over the k+1 columns t..t+k and returns the aux features of all of them (the
       compiled segment captures them; no extra layer runs);
    2. ``update`` runs the draft over those k+1 columns (the token at t+a is the verification's own next token y,
       the rest the drafts), so each row's accepted columns t..t+a get their draft K/V from the target's features;
       columns after t+a are rejected: holes, masked out for good, in the target's cache and in the draft's;
    3. the draft's output at column t+a is the first draft of the next step; ``chain`` runs k-1 more single-column
       steps on the draft's own hidden state, writing their K/V at the next step's columns, where the next
       ``update`` overwrites them with entries from the target's features.

    Every pass writes into preallocated buffers at a position tensor (``engine/static.py``'s layout): on a
    compiled engine the update (k+1 columns) and each chained step are compiled graphs; nothing is concatenated.
    """

    def __init__(self, engine, draft) -> None:
        from layerexit.errors import ConfigError
        from layerexit.models.eagle3 import check_target

        spec = draft.spec
        check_target(spec, engine.model.config, field_name="draft")
        if (spec.num_key_value_heads, spec.head_dim) != (engine.kv_heads, engine.head_dim):
            raise ConfigError(f"draft: the EAGLE-3 layer has {spec.num_key_value_heads} K/V heads of {spec.head_dim}, "
                              f"the model {engine.kv_heads} of {engine.head_dim}",
                              "train the draft with the target's attention shape")
        rotary = engine.parts.rotary
        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim))
        ours = getattr(rotary, "inv_freq", None)
        if ours is None or ours.shape != inv.shape or not torch.allclose(ours.float().cpu(), inv, rtol=1e-4):
            raise ConfigError("draft: the EAGLE-3 draft's rope_theta does not match the model's rotary embedding",
                              "train the draft for this model")
        self.draft = draft.to(device=engine.device, dtype=engine.dtype).eval()
        self.aux = tuple(spec.aux_layers)
        self.cache_layer = engine.L  # 0-based index of the draft's layer in the loop's cache
        self.spec = _Spec(spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, float(spec.rms_norm_eps),
                          spec.head_dim ** -0.5, (spec.num_attention_heads * spec.head_dim,
                                                  spec.num_key_value_heads * spec.head_dim,
                                                  spec.num_key_value_heads * spec.head_dim), spec.intermediate_size)
        d = self.draft
        layer, attn = d.midlayer, d.midlayer.self_attn
        with torch.no_grad():
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous()
            gu = torch.cat([layer.mlp["gate_proj"].weight, layer.mlp["up_proj"].weight]).contiguous()
        self.weights = (engine.parts.embed.weight, d.fc.weight, layer.input_layernorm.weight,
                        layer.hidden_norm.weight, qkv, attn.o_proj.weight, layer.post_attention_layernorm.weight, gu,
                        layer.mlp["down_proj"].weight, d.norm.weight, d.lm_head.weight, d.d2t)
        # FLOPs of the draft layer per position (a multiply-add = 2), without its attention over the context
        h, a = spec.hidden_size, len(self.aux)
        q_dim, kv_dim = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
        self._fc = 2 * a * spec.target_hidden_size * h
        self._layer = 2 * 2 * h * (q_dim + 2 * kv_dim) + 2 * q_dim * h + 2 * 3 * h * spec.intermediate_size
        self._head = 2 * h * spec.draft_vocab_size
        self._q_dim = q_dim

    def flops(self, positions: int, kv_len: int, fused: bool, heads: int) -> int:
        """One draft pass over ``positions`` columns attending over ``kv_len`` keys, scoring ``heads`` columns."""
        return (positions * (self._layer + (self._fc if fused else 0)) + 4 * self._q_dim * positions * kv_len
                + heads * self._head)

    def _pass(self, engine, tokens, hidden, s, last, cache, fuse: bool):
        args = (tokens, hidden, s, last, self.weights, cache.keys[self.cache_layer], cache.values[self.cache_layer],
                self.spec, fuse)
        out = engine.compiled.run_draft(args) if engine.compiled is not None else None
        if out is None:
            out = draft_layer(*args)
        return out

    def features(self, captured: dict[int, torch.Tensor]) -> torch.Tensor:
        """The aux hidden states side by side, as ``fc`` reads them. Shape: A x (B, n, H) -> (B, n, A*H)."""
        return torch.cat([captured[a] for a in self.aux], dim=-1)

    def start(self, engine, rows, captured, s, first_tokens: torch.Tensor, q_start: int, k: int
              ) -> tuple[torch.Tensor, int]:
        """After a prefill of columns q_start..q_start+P-1 (P = s.index's length): the draft over the prompt (the
        last column reads the first generated token), then k-1 chained drafts. Returns drafts (B, k) and FLOPs."""
        n = s.index.shape[0]
        tokens = torch.cat([rows.tokens[:, q_start + 1 : q_start + n], first_tokens[:, None]], dim=1)
        last = torch.full((tokens.shape[0],), n - 1, dtype=torch.long, device=tokens.device)
        tok, hid = self._pass(engine, tokens, self.features(captured), s, last, rows.cache, fuse=True)
        rows.cache.lengths[self.cache_layer] = q_start + n
        flops = self.flops(n, q_start + n, True, 1)
        drafts, more = self.chain(engine, rows, tok, hid, q_start + n, k)
        return drafts, flops + more

    def update(self, engine, rows, captured, s, t: int, drafts: torch.Tensor, accepted: torch.Tensor,
               bonus: torch.Tensor) -> tuple[torch.Tensor, int]:
        """After verifying ``drafts`` (B, k) at columns t+1..t+k: the draft over columns t..t+k from the target's
        features (row j's column t + accepted[j] reads its next token ``bonus[j]``), then k-1 chained drafts.
        Returns the next step's drafts (B, k) and FLOPs."""
        k = drafts.shape[1]
        tokens = torch.cat([drafts, bonus[:, None]], dim=1)
        tokens = tokens.scatter(1, accepted[:, None], bonus[:, None])  # Shape: (B, k+1)
        tok, hid = self._pass(engine, tokens, self.features(captured), s, accepted, rows.cache, fuse=True)
        rows.cache.lengths[self.cache_layer] = t + k + 1
        flops = self.flops(k + 1, t + k + 1, True, 1)
        nxt, more = self.chain(engine, rows, tok, hid, t + k + 1, k)
        return nxt, flops + more

    def chain(self, engine, rows, tok: torch.Tensor, hid: torch.Tensor, t_next: int, k: int
              ) -> tuple[torch.Tensor, int]:
        """Drafts 2..k on the draft's own hidden state, at columns t_next..t_next+k-2 (scratch: the next update
        overwrites them). Shape: tok (B, 1), hid (B, 1, H) -> drafts (B, k)."""
        out = [tok]
        if k > 1:
            valid = rows.valid
            width = valid.shape[1]
            cols = torch.arange(width, device=valid.device)
            base = valid & (cols < t_next)[None]
            pos0 = valid[:, :t_next].sum(dim=1)  # Shape: (B,): the RoPE position of column t_next
            ropes = engine.rope(hid, pos0[:, None] + torch.arange(k - 1, device=valid.device)[None])
            for i in range(1, k):
                c = t_next + i - 1
                mask = (base | ((cols >= t_next) & (cols <= c))[None])[:, None, None, :]  # Shape: (B, 1, 1, W)
                s = StepInputs(ropes[0][:, i - 1 : i].contiguous(), ropes[1][:, i - 1 : i].contiguous(), mask,
                               torch.tensor([c], device=valid.device))  # contiguous: the same strides for every k
                tok, hid = self._pass(engine, tok, hid, s, None, rows.cache, fuse=False)
                out.append(tok)
        flops = sum(self.flops(1, t_next + i, False, 1) for i in range(1, k))
        return torch.cat(out, dim=1), flops


class ReplayDrafter:
    """The free perfect draft: each row's reference answer (the final layer's own tokens) replayed as its draft,
    at no draft cost. Verification accepts every draft, so a run with it is the decode loop's own ceiling for k."""

    def __init__(self, answers: Sequence[Sequence[int]]) -> None:
        self.answers = [list(a) for a in answers]

    def propose(self, index: Sequence[int], counts: Sequence[int], k: int, pad: int
                ) -> tuple[list[list[int]], list[int]]:
        """k tokens per row (padded), and how many of them come from the answer."""
        drafts, lengths = [], []
        for i, c in zip(index, counts):
            answer = self.answers[i] if i < len(self.answers) else []
            d = answer[c : c + k]
            lengths.append(len(d))
            drafts.append(d + [pad] * (k - len(d)))
        return drafts, lengths
