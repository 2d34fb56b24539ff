"""Terminal tables (rich) for reports a user reads in the console."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from layerexit.evaluation.alignment import AlignmentReport


def alignment_table(report: AlignmentReport, layers: Iterable[int] | None = None, title: str | None = None) -> Table:
    """Rows: layer, % aligned with the final layer, mean confidence, alignment among confident tokens."""
    table = Table(title=title or f"Per-layer alignment with the final layer ({report.num_prompts} prompts, "
                  f"{report.num_tokens} tokens)")
    table.add_column("layer", justify="right")
    table.add_column("aligned %", justify="right")
    table.add_column("mean conf", justify="right")
    table.add_column("aligned % | conf>=0.9", justify="right")
    table.add_column("share conf>=0.9", justify="right")
    wanted = set(layers) if layers is not None else None
    for row in report.rows:
        if wanted is not None and row.layer not in wanted:
            continue
        hi_bins = [i for i, lo in enumerate(report.bin_edges[:-1]) if lo >= 0.9 - 1e-9]
        hi_n = sum(row.bin_counts[i] for i in hi_bins)
        hi_match = sum((row.bin_alignment[i] or 0.0) * row.bin_counts[i] for i in hi_bins)
        table.add_row(
            str(row.layer),
            f"{100 * row.alignment:.1f}",
            f"{row.mean_confidence:.3f}",
            f"{100 * hi_match / hi_n:.1f}" if hi_n else "-",
            f"{100 * hi_n / row.tokens:.1f}" if row.tokens else "-",
        )
    return table


def print_table(table: Table) -> None:
    Console().print(table)
