"""ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune_thresholds.py --config tune/smollm2.yaml

Search per-layer exit thresholds with Ray Tune and export them for Serve.
Locally: .venv/bin/python jobs/tune_thresholds.py --config tune/smollm2.yaml search.num_trials=20 \\
             --serve-config serve_configs/smollm2.yaml

Overrides are dotted key=value pairs on the YAML (e.g. quality.min=0.85 prompts.validation.limit=10).
Outputs (in output_dir): pareto.png, trials.csv, front.csv, report.md, summary.json, thresholds.yaml,
user_config.yaml, traces.npz, ray_results/. With --serve-config the deployment's user_config block is rewritten
in place (comments kept); `serve deploy <file>` then applies it without restarting replicas.

Check only (load and validate the YAML with its overrides and the search space, start nothing):
    python jobs/tune_thresholds.py --config tune/smollm2.yaml --check

Exit status: 0 done (or valid, with --check); 2 bad input (one line on stderr); 3 no confirmed threshold set reached quality.min (the best
found is still reported and exported to output_dir, the Serve config is left unchanged).
"""

from __future__ import annotations

import argparse
import sys


def check(config: str, overrides: list[str], serve_config: str | None) -> int:
    """--check: the same validation ``run_tuning`` does before it starts Ray, and nothing else."""
    from pathlib import Path

    from layerexit.config import load_config
    from layerexit.errors import ConfigError, LayerexitError
    from layerexit.tuning.search import TuneSearchConfig
    from layerexit.tuning.space import ThresholdSpace

    try:
        cfg = load_config(TuneSearchConfig, config, list(overrides))
        # Unset space.exit_layers: the model's own exits, read when the job starts (--check downloads nothing).
        space = ThresholdSpace.from_settings(cfg.space).check() if cfg.space.exit_layers is not None else None
        if space is not None and cfg.search.algorithm == "grid" and \
                space.grid_size(cfg.search.grid_points) > cfg.search.num_trials:
            raise ConfigError(f"search.grid_points: the grid has {space.grid_size(cfg.search.grid_points)} points, "
                              f"over search.num_trials={cfg.search.num_trials}",
                              "lower search.grid_points, tune fewer layers, or raise search.num_trials")
        if serve_config is not None and not Path(serve_config).is_file():
            raise ConfigError(f"--serve-config {serve_config} does not exist", "pass an existing serve_configs/*.yaml")
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layers = list(space.layers) if space is not None else "the model's own exits (read when the job starts)"
    print(f"config {config} is valid: model {cfg.model.spec}, layers {layers}, "
          f"{cfg.search.algorithm} search of {cfg.search.num_trials} trials")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="search YAML, e.g. tune/smollm2.yaml")
    parser.add_argument("--serve-config", default=None, help="Serve config whose user_config to rewrite in place")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, its overrides and the search space, then exit (starts nothing)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. search.num_trials=20")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.config, args.overrides, args.serve_config)
    from layerexit.tuning.search import tune_command

    return tune_command(args.config, args.overrides, args.serve_config)


if __name__ == "__main__":
    sys.exit(main())
