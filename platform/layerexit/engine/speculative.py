"""Lossless self-speculative decoding (LayerSkip-style) with LITE exits as the draft model.

Draft up to k tokens greedily from an early layer d (layers 1..d, cached), then run layers d+1..L once over
the k+1 drafted positions, reusing the draft's hidden states and its cache for layers 1..d. The longest
prefix whose drafts equal the final layer's greedy tokens is kept, plus the final layer's token after it;
the cache is cropped back to the kept positions. The output equals greedy decoding from the final layer.

Sequences are decoded one at a time (acceptance lengths differ per sequence, and so would their caches).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from layerexit.engine.cache import ExitKVCache


def stream_self_speculative(engine, prompts: Sequence[Sequence[int]], draft_layer: int, num_draft: int,
                            params, results=None) -> Iterator[list]:
    from layerexit.engine.decode import TokenEvent

    F = engine.flops
    L = engine.L
    d = min(draft_layer, L)
    for index, prompt in enumerate(prompts):
        p = params[index]
        P = len(prompt)
        T_max = P + p.max_new_tokens + num_draft + 1
        cache = ExitKVCache(L, 1, T_max, engine.kv_heads, engine.head_dim, engine.dtype, engine.device)
        valid = torch.ones((1, T_max), dtype=torch.bool, device=engine.device)
        pad_off = torch.zeros(1, dtype=torch.long, device=engine.device)

        def run(first: int, last: int, h: torch.Tensor, start: int) -> torch.Tensor:
            n = h.shape[1]
            pos = engine.positions(pad_off, start, n)
            rope = engine.rope(h, pos)
            am = engine.attention_mask(valid, start, n)
            for k in range(first, last + 1):
                h = engine.run_layer(k, h, am, pos, rope, cache)
            return h

        ids = torch.tensor([list(prompt)], dtype=torch.long, device=engine.device)
        h = run(1, L, engine.parts.embed(ids), 0)
        if results is not None:
            results[index].prefill_flops = L * F.layer(P, P)
        logits, probs = engine.head_probs(h[:, -1])
        z = int(probs.argmax(-1))
        count = 1
        reason = _finish(z, count, p, engine.eos)
        yield [TokenEvent(index, z, L, float(probs.max()), F.head(1), F.head(1), reason is not None, reason)]
        t = P  # position of z, not yet run through any layer
        while reason is None:
            k = max(0, min(num_draft, p.max_new_tokens - count - 1))
            flops = 0
            drafts: list[int] = []
            hidden = []
            x = z
            for i in range(k + 1):
                hd = run(1, d, engine.parts.embed(torch.tensor([[x]], device=engine.device)), t + i)
                flops += d * F.layer(1, t + i + 1)
                hidden.append(hd)
                if i < k:
                    _, dp = engine.head_probs(hd[:, -1])
                    flops += F.head(1)
                    x = int(dp.argmax(-1))
                    drafts.append(x)
            hv = run(d + 1, L, torch.cat(hidden, dim=1), t) if d < L else torch.cat(hidden, dim=1)
            flops += (L - d) * F.layer(k + 1, t + k + 1) + (k + 1) * F.head(1)
            _, vp = engine.head_probs(hv[0])
            preds = vp.argmax(-1).tolist()
            accepted = 0
            while accepted < k and preds[accepted] == drafts[accepted]:
                accepted += 1
            emitted = [*drafts[:accepted], preds[accepted]]
            layers = [d] * accepted + [L]
            confs = [float(vp[i].max()) for i in range(accepted + 1)]
            events = []
            share = flops // len(emitted)
            for tok, layer, conf in zip(emitted, layers, confs, strict=True):
                count += 1
                reason = _finish(tok, count, p, engine.eos)
                events.append(TokenEvent(index, tok, layer, conf, share, L * F.layer(1, t + 1) + F.head(1),
                                         reason is not None, reason))
                if reason is not None:
                    break
            yield events
            cache.crop(t + accepted + 1)
            z = preds[accepted]
            t += accepted + 1


def _finish(token: int, count: int, p, eos: set[int]) -> str | None:
    if token in eos or token in p.stop_token_ids:
        return "stop"
    if count >= p.max_new_tokens:
        return "length"
    return None
