"""The threshold search space: one parameter per exit layer, mapped onto its allowed range.

Each layer l gets ``u_l`` in [0, 1] (and, with optional layers, ``use_l`` in {True, False}). ``thresholds`` turns
the parameters into {layer: threshold}: with the non-increasing constraint, layer l's threshold lies in
[max low of l and every deeper active layer, min(high of l, the previous active layer's threshold)], an interval
that is never empty once ``check`` has passed. So every point optuna or random search proposes is feasible.
Grid search enumerates thresholds directly instead (``grid_points`` values per layer, evenly over its range,
plus "off" for optional layers), keeping only combinations that satisfy the constraint, so no two grid trials
score the same set. Every layer off is never a point of the space: that is the final layer, which the search
adds to the front as a known reference (FLOPs ratio 1, quality 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from layerexit.errors import ConfigError
from layerexit.tuning.config import SearchSpaceSettings


GRID_KEY = "grid_thresholds"


def _u(layer: int) -> str:
    return f"u_{layer:02d}"


def _use(layer: int) -> str:
    return f"use_{layer:02d}"


@dataclass(frozen=True)
class ThresholdSpace:
    """Exit layers, their ranges, the constraint; validated by ``check``."""

    layers: tuple[int, ...]
    ranges: Mapping[int, tuple[float, float]]
    non_increasing: bool = True
    optional: bool = False
    decimals: int = 3

    @classmethod
    def from_settings(cls, s: SearchSpaceSettings) -> "ThresholdSpace":
        if s.exit_layers is None:
            raise ConfigError("space.exit_layers is unset: the model's own exits are read when the search starts",
                              "call SearchSpaceSettings.resolve_exit_layers(model) first, or list the layers")
        return cls(tuple(s.exit_layers), {l: s.range_of(l) for l in s.exit_layers}, s.non_increasing,
                   s.optional_layers, s.decimals)

    # ---------------------------------------------------------------------------------------------- checks
    def check(self, num_layers: int | None = None) -> "ThresholdSpace":
        """Raise ConfigError when nothing can be searched (no layers, empty ranges, impossible constraint)."""
        if not self.layers:
            raise ConfigError("the search space is empty: space.exit_layers names no layer",
                              "list the exit layers to tune, e.g. space.exit_layers=[8,12,16,20,24,28]")
        for layer in self.layers:
            lo, hi = self.ranges[layer]
            if lo > hi:
                raise ConfigError(f"the search space is empty: layer {layer}'s range [{lo}, {hi}] is empty",
                                  "give each range as [low, high] with low <= high")
        if self.non_increasing:
            for a, b in itertools.combinations(self.layers, 2):  # a shallower than b
                if self.ranges[a][1] < self.ranges[b][0]:
                    raise ConfigError(
                        f"the search space is empty: thresholds must not increase with depth, but layer {a}'s "
                        f"high {self.ranges[a][1]} is below deeper layer {b}'s low {self.ranges[b][0]}",
                        "widen those ranges or set space.non_increasing=false")
        if num_layers is not None:
            bad = [l for l in self.layers if not 1 <= l < num_layers]
            if bad:
                raise ConfigError(f"space.exit_layers {bad} are not intermediate layers of this {num_layers}-layer "
                                  "model", f"use layers 1..{num_layers - 1}")
        return self

    # ------------------------------------------------------------------------------------------- mapping
    def active_layers(self, params: Mapping) -> list[int]:
        """Layers switched on. With optional layers at least one stays on (the deepest, if the point switches every
        one off): "no exit layer" is the final layer itself, a known reference rather than something to search."""
        out = [l for l in self.layers if not self.optional or bool(params.get(_use(l), True))]
        if self.optional and not out:
            out = [self.layers[-1]]
        return out

    def _bounds(self, active: Sequence[int], thresholds: Mapping[int, float], i: int) -> tuple[float, float]:
        layer = active[i]
        lo, hi = self.ranges[layer]
        if self.non_increasing:
            lo = max(self.ranges[l][0] for l in active[i:])
            if i > 0:
                hi = min(hi, thresholds[active[i - 1]])
        return lo, hi

    def thresholds(self, params: Mapping) -> dict[int, float]:
        """{layer: threshold} for a point of the space (rounded to ``decimals``)."""
        if GRID_KEY in params:
            return {int(k): float(v) for k, v in params[GRID_KEY].items()}
        active = self.active_layers(params)
        out: dict[int, float] = {}
        for i, layer in enumerate(active):
            lo, hi = self._bounds(active, out, i)
            u = min(1.0, max(0.0, float(params[_u(layer)])))
            value = round(lo + u * (hi - lo), self.decimals)
            out[layer] = min(1.0, max(0.0, value))
        return out

    def params_for(self, thresholds: Mapping[int, float]) -> dict | None:
        """The point of the space closest to ``thresholds`` (clipped into the ranges); None if not representable
        (names a layer outside the space, leaves out a layer that cannot be switched off, or names none)."""
        table = {int(k): float(v) for k, v in thresholds.items()}
        if not table or set(table) - set(self.layers):
            return None
        if not self.optional and set(table) != set(self.layers):
            return None
        active = [l for l in self.layers if l in table]
        params: dict = {}
        placed: dict[int, float] = {}
        for layer in self.layers:
            if self.optional:
                params[_use(layer)] = layer in table
            params[_u(layer)] = 0.5
        for i, layer in enumerate(active):
            lo, hi = self._bounds(active, placed, i)
            u = 0.0 if hi <= lo else min(1.0, max(0.0, (table[layer] - lo) / (hi - lo)))
            params[_u(layer)] = u
            placed[layer] = round(lo + u * (hi - lo), self.decimals)
        return params

    # -------------------------------------------------------------------------------------- Tune spaces
    def tune_space(self, algorithm: str, grid_points: int = 3) -> dict:
        """Ray Tune ``param_space`` for ``algorithm`` (optuna and random sample; grid enumerates)."""
        from ray import tune

        if algorithm == "grid":
            return {GRID_KEY: tune.grid_search([{str(l): v for l, v in t.items()} for t in self.grid(grid_points)])}
        space: dict = {}
        for layer in self.layers:
            space[_u(layer)] = tune.uniform(0.0, 1.0)
            if self.optional:
                space[_use(layer)] = tune.choice([True, False])
        return space

    def grid(self, grid_points: int) -> list[dict[int, float]]:
        """Every feasible combination of ``grid_points`` evenly spaced values per layer (None = layer off)."""
        choices = []
        for layer in self.layers:
            lo, hi = self.ranges[layer]
            values: list = sorted({round(float(v), self.decimals) for v in np.linspace(lo, hi, grid_points)})
            choices.append(([None] if self.optional else []) + values)
        out = []
        for combo in itertools.product(*choices):
            table = {l: v for l, v in zip(self.layers, combo) if v is not None}
            if not table:
                continue  # every layer off: the final layer, a reference rather than a grid point
            values = [table[l] for l in sorted(table)]
            if self.non_increasing and any(a < b for a, b in zip(values, values[1:])):
                continue
            out.append(table)
        return out

    def grid_size(self, grid_points: int) -> int:
        return len(self.grid(grid_points))
