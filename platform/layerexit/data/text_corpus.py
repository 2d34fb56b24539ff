"""Plain English text that installs with the package registries: the long descriptions (READMEs) of the Python
distributions installed beside layerexit, and the Python documentation's topic pages shipped with the standard
library (``pydoc_data``). No download, no dataset: any environment that runs the job has it.

The frozen model labels any text with one forward pass (its own next-token distribution at every position), so
this text is training data for drafts and exits at a fraction of the cost of generating answers. Every position is
trained on (labels = the tokens), no prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from layerexit.data.datasets import TokenizedExample


def installed_texts(min_chars: int = 400) -> Iterator[tuple[str, str]]:
    """(name, text) of every installed distribution's description and of each pydoc topic, in a fixed order."""
    from importlib import metadata

    seen: set[str] = set()
    dists = sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower())
    for dist in dists:
        name = (dist.metadata.get("Name") or "").lower()
        if not name or name in seen:
            continue
        seen.add(name)
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        text = text.strip() if isinstance(text, str) else ""
        if len(text) >= min_chars:
            yield f"pkg:{name}", text
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped Python build
        return
    for key in sorted(topics):
        if len(topics[key]) >= min_chars:
            yield f"pydoc:{key}", topics[key]


def package_text_examples(tokenizer, max_tokens: int, max_length: int, min_length: int = 32
                          ) -> tuple[list[TokenizedExample], dict]:
    """Chunks of ``max_length`` tokens of the installed text, round-robin over documents (so a cap still covers
    many of them), until ``max_tokens`` tokens. Labels = the tokens (every position trained), prompt_len 0."""
    per_doc: list[list[list[int]]] = []
    names = []
    for name, text in installed_texts():
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        chunks = [c for c in chunks if len(c) >= min_length]
        if chunks:
            per_doc.append(chunks)
            names.append(name)
    examples: list[TokenizedExample] = []
    total = 0
    depth = 0
    h = hashlib.sha256()
    while total < max_tokens and any(depth < len(c) for c in per_doc):
        for chunks in per_doc:
            if depth < len(chunks) and total < max_tokens:
                c = chunks[depth]
                examples.append(TokenizedExample(list(c), list(c), 0))
                total += len(c)
                h.update(str(c).encode())
        depth += 1
    meta = {"documents": len(per_doc), "examples": len(examples), "tokens": total, "fingerprint": h.hexdigest()[:16],
            "source": "installed distributions' descriptions + pydoc_data topics"}
    return examples, meta
