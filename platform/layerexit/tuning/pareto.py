"""The Pareto front of (FLOPs ratio: lower is better, quality: higher is better) and its plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Point:
    """One scored threshold set (a trial, a preset, the classifier, a confirmed candidate)."""

    name: str
    flops_ratio: float
    quality: float
    thresholds: dict[int, float] = field(default_factory=dict)
    kind: str = "trial"  # trial | preset | classifier | final | confirmed
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = {str(k): v for k, v in self.thresholds.items()}
        return d


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good on both objectives and strictly better on one."""
    return (a.flops_ratio <= b.flops_ratio and a.quality >= b.quality
            and (a.flops_ratio < b.flops_ratio or a.quality > b.quality))


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Non-dominated points, cheapest first; of identical (flops, quality) pairs the first one is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i].flops_ratio, -points[i].quality, i))
    front: list[Point] = []
    best_quality = float("-inf")
    for i in order:
        p = points[i]
        if p.quality > best_quality:
            front.append(p)
            best_quality = p.quality
    return front


def spread(front: Sequence[Point], k: int) -> list[Point]:
    """Up to k points spread evenly along a front (both ends included)."""
    if k >= len(front):
        return list(front)
    if k == 1:
        return [front[0]]
    idx = sorted({round(i * (len(front) - 1) / (k - 1)) for i in range(k)})
    return [front[i] for i in idx]


def write_points(points: Sequence[Point], path: str | Path) -> Path:
    """CSV (name, kind, flops_ratio, quality, thresholds as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "kind", "flops_ratio", "quality", "thresholds"])
        for p in points:
            w.writerow([p.name, p.kind, f"{p.flops_ratio:.6f}", f"{p.quality:.6f}",
                        json.dumps({str(k): v for k, v in sorted(p.thresholds.items())})])
    return path


def plot_front(trials: Sequence[Point], front: Sequence[Point], references: Sequence[Point], path: str | Path,
               title: str = "Exit thresholds: FLOPs vs quality",
               quality_label: str = "agreement with final layer (traces)",
               confirmed: Sequence[Point] = (), chosen: Point | None = None, min_quality: float | None = None,
               confirmed_label: str = "quality (real generation)", confirmed_min: float | None = None) -> Path:
    """Left: every trial, the front, the references (presets, classifier, final) scored on traces. Right (when
    ``confirmed`` is given): the confirmed candidates from real generation, with the minimum quality line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = 2 if confirmed else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7.5 * ncols, 5), squeeze=False)
    ax = axes[0][0]
    if trials:
        ax.scatter([p.flops_ratio for p in trials], [p.quality for p in trials], s=14, c="0.7", label="trials")
    if front:
        ax.step([p.flops_ratio for p in front], [p.quality for p in front], where="post", c="tab:blue", lw=1.5,
                label="Pareto front")
        ax.scatter([p.flops_ratio for p in front], [p.quality for p in front], s=24, c="tab:blue")
    markers = {"preset": ("s", "tab:orange"), "classifier": ("^", "tab:green"), "final": ("*", "black")}
    for p in references:
        m, c = markers.get(p.kind, ("D", "tab:purple"))
        ax.scatter([p.flops_ratio], [p.quality], marker=m, s=70, c=c, edgecolors="black", zorder=5)
        ax.annotate(p.name, (p.flops_ratio, p.quality), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for p in confirmed:  # where the confirmed candidates sat on the traces
        t = p.extra.get("trace_flops_ratio"), p.extra.get("trace_agreement")
        if None not in t:
            ax.scatter([t[0]], [t[1]], marker="x", s=50, c="tab:red", zorder=6)
    if min_quality is not None:
        ax.axhline(min_quality, ls="--", c="0.4", lw=1, label=f"minimum {min_quality:g}")
    ax.set_title(title)
    ax.set_ylabel(quality_label)
    if confirmed:
        bx = axes[0][1]
        for p in confirmed:
            bx.scatter([p.flops_ratio], [p.quality], marker="x", s=60, c="tab:red", zorder=6)
            bx.annotate(p.name, (p.flops_ratio, p.quality), textcoords="offset points", xytext=(6, 4), fontsize=8)
        bx.scatter([1.0], [1.0], marker="*", s=90, c="black", label="final layer")
        if chosen is not None:
            bx.scatter([chosen.flops_ratio], [chosen.quality], marker="o", s=170, facecolors="none",
                       edgecolors="tab:red", lw=2, zorder=7, label="chosen")
        if confirmed_min is not None:
            bx.axhline(confirmed_min, ls="--", c="0.4", lw=1, label=f"minimum {confirmed_min:g}")
        bx.set_title("confirmed candidates (validation prompts)")
        bx.set_ylabel(confirmed_label)
    for a in [ax for row in axes for ax in row]:
        a.axvline(1.0, ls=":", c="0.4", lw=1)
        a.set_xlabel("decode FLOPs / final layer's (lower is better)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fronts_by(trials: Sequence[Point], key: str, final: Point | None = None) -> dict[str, list[Point]]:
    """The Pareto front of each group of trials (grouped by ``extra[key]``, e.g. the check head), each with the
    final layer as the no-exit end when given."""
    groups: dict[str, list[Point]] = {}
    for p in trials:
        groups.setdefault(str(p.extra.get(key)), []).append(p)
    return {g: pareto_front([*ps, *([final] if final is not None else [])]) for g, ps in sorted(groups.items())}


def cheapest_at(front: Sequence[Point], min_quality: float) -> Point | None:
    """The cheapest point of ``front`` reaching ``min_quality`` (None if none does)."""
    ok = [p for p in front if p.quality >= min_quality]
    return min(ok, key=lambda p: p.flops_ratio) if ok else None


def plot_fronts(fronts: dict[str, Sequence[Point]], path: str | Path, title: str, oracle: float | None = None,
                quality_label: str = "agreement with final layer (traces)") -> Path:
    """One step line per group's front (e.g. per check head): how the check head moves the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, front in fronts.items():
        xs, ys = [p.flops_ratio for p in front], [p.quality for p in front]
        ax.step(xs, ys, where="post", lw=1.5, label=f"{name} ({len(front)} points)")
        ax.scatter(xs, ys, s=14)
    if oracle is not None:
        ax.axvline(oracle, ls=":", c="black", lw=1, label=f"oracle ceiling {oracle:.2f}x")
    ax.axvline(1.0, ls="--", c="0.5", lw=1)
    ax.set_xlabel("FLOPs ratio vs final layer (traces)")
    ax.set_ylabel(quality_label)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
