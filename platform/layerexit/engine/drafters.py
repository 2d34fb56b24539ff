"""Where self-speculative draft tokens come from, and when a draft stops.

- ``layer``: greedy tokens of a shallow exit (layers 1..d, through the exit's adapter when the model has one,
  optionally scored over a static draft vocabulary). Its hidden states and cache are reused by verification,
  which runs only layers d+1..L.
- ``ngram`` (prompt lookup): the tokens that followed the latest earlier occurrence of the sequence's last
  n-gram (n = ``max_ngram`` .. 1) in the prompt or the answer so far. Costs no model FLOPs; pays where answers
  quote the prompt (rewrites, extraction, code edits). Verification then runs layers 1..L.
- ``layer+ngram``: a step uses the n-gram proposal when every row of the batch has one, else the layer draft.

Draft length: ``num_draft`` tokens, or, with ``draft_stop`` set, fewer: a layer draft stops at the first token
whose draft probability is below ``draft_stop`` (Kangaroo / LayerSkip's dynamic length). Verification keeps
the output equal to the final layer's greedy tokens whatever the draft.
"""

from __future__ import annotations

from collections.abc import Sequence

DRAFT_SOURCES = ("layer", "ngram", "layer+ngram")


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
