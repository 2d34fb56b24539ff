"""Per-layer alignment with the final layer (LITE paper section 6.3/6.4, Figures 5 and 6).

For a response generated greedily by the final layer, every layer l is asked, at each response position and
given the same prefix, for its top-1 token through the final norm and LM head. Alignment is the share of
positions where that equals the final layer's top-1; confidence is the top-1 softmax probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from layerexit.engine.traces import layer_predictions
from layerexit.models.exits import decoder_parts

DEFAULT_BINS = 10


@dataclass
class LayerAlignment:
    """One row of the alignment table."""

    layer: int
    alignment: float  # share of tokens whose top-1 equals the final layer's
    mean_confidence: float
    tokens: int
    bin_counts: list[int] = field(default_factory=list)  # tokens per confidence bin
    bin_alignment: list[float | None] = field(default_factory=list)  # alignment within each bin (None: empty)


@dataclass
class AlignmentReport:
    """Alignment of every layer on a set of generated responses."""

    num_layers: int
    num_prompts: int
    num_tokens: int
    bin_edges: list[float]
    rows: list[LayerAlignment]

    def row(self, layer: int) -> LayerAlignment:
        return next(r for r in self.rows if r.layer == layer)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Accumulator:
    matches: int = 0
    conf_sum: float = 0.0
    tokens: int = 0
    bin_counts: list[int] | None = None
    bin_matches: list[int] | None = None


def alignment_from_generations(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    bins: int = DEFAULT_BINS,
    show_progress: bool = True,
) -> AlignmentReport:
    """Alignment of every layer with the final layer over (prompt, final-layer response) pairs."""
    L = decoder_parts(model).num_layers
    edges = [i / bins for i in range(bins + 1)]
    acc = [_Accumulator(bin_counts=[0] * bins, bin_matches=[0] * bins) for _ in range(L)]
    total_tokens = 0
    for prompt, response in tqdm(list(zip(prompts, responses, strict=True)), desc="alignment", disable=not show_progress):
        if not response:
            continue
        top1, conf, _ = layer_predictions(model, [*prompt, *response], len(prompt))
        final = top1[L - 1]
        total_tokens += final.numel()
        bin_idx = (conf * bins).long().clamp(max=bins - 1)
        for li in range(L):
            match = top1[li] == final
            a = acc[li]
            a.matches += int(match.sum())
            a.conf_sum += float(conf[li].sum())
            a.tokens += final.numel()
            for b in range(bins):
                sel = bin_idx[li] == b
                a.bin_counts[b] += int(sel.sum())
                a.bin_matches[b] += int((match & sel).sum())
    rows = []
    for li, a in enumerate(acc):
        rows.append(
            LayerAlignment(
                layer=li + 1,
                alignment=a.matches / a.tokens if a.tokens else 0.0,
                mean_confidence=a.conf_sum / a.tokens if a.tokens else 0.0,
                tokens=a.tokens,
                bin_counts=list(a.bin_counts),
                bin_alignment=[m / c if c else None for m, c in zip(a.bin_matches, a.bin_counts, strict=True)],
            )
        )
    return AlignmentReport(num_layers=L, num_prompts=len(prompts), num_tokens=total_tokens, bin_edges=edges, rows=rows)


def plot_alignment(
    reports: dict[str, AlignmentReport], path: str | Path, highlight_layers: Sequence[int] | None = None
) -> Path:
    """Figure 5 (alignment per layer) and Figure 6 (alignment vs confidence) in one PNG.

    ``reports`` maps a label (e.g. "standard IT", "LITE") to its report; several go on the same axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = ["-", "--", ":", "-."]
    for i, (label, rep) in enumerate(reports.items()):
        layers = [r.layer for r in rep.rows]
        ax1.plot(layers, [100 * r.alignment for r in rep.rows], styles[i % 4], marker="o", ms=3, label=label)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("% tokens equal to final layer's top-1")
    ax1.set_title("Alignment with the final layer (Fig. 5)")
    ax1.set_ylim(0, 102)
    ax1.grid(alpha=0.3)
    ax1.legend()
    first = next(iter(reports.values()))
    if highlight_layers is None:
        L = first.num_layers
        highlight_layers = sorted({max(1, round(L * f)) for f in (0.25, 0.4, 0.55, 0.7, 0.85)} - {L})
    centers = [(a + b) / 2 for a, b in zip(first.bin_edges[:-1], first.bin_edges[1:], strict=True)]
    cmap = plt.get_cmap("viridis")
    for j, layer in enumerate(highlight_layers):
        color = cmap(j / max(1, len(highlight_layers) - 1))
        for i, (label, rep) in enumerate(reports.items()):
            row = rep.row(layer)
            xs = [c for c, v in zip(centers, row.bin_alignment, strict=True) if v is not None]
            ys = [100 * v for v in row.bin_alignment if v is not None]
            name = f"L{layer}" if len(reports) == 1 else f"L{layer} {label}"
            ax2.plot(xs, ys, styles[i % 4], marker="o", ms=3, color=color, label=name)
    ax2.set_xlabel("confidence (top-1 softmax probability)")
    ax2.set_ylabel("% aligned with final layer")
    ax2.set_title("Confidence vs alignment (Fig. 6)")
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 102)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
