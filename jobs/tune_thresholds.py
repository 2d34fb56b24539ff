"""ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune_thresholds.py --config tune/smollm2.yaml

Search per-layer exit thresholds with Ray Tune and export them for Serve.
Locally: .venv/bin/python jobs/tune_thresholds.py --config tune/smollm2.yaml search.num_trials=20 \\
             --serve-config serve_configs/smollm2.yaml

Overrides are dotted key=value pairs on the YAML (e.g. quality.min=0.85 prompts.validation.limit=10).
Outputs (in output_dir): pareto.png, trials.csv, front.csv, report.md, summary.json, thresholds.yaml,
user_config.yaml, traces.npz, ray_results/. With --serve-config the deployment's user_config block is rewritten
in place (comments kept); `serve deploy <file>` then applies it without restarting replicas.

Exit status: 0 done; 2 bad input (one line on stderr); 3 no confirmed threshold set reached quality.min (the best
found is still reported and exported to output_dir, the Serve config is left unchanged).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="search YAML, e.g. tune/smollm2.yaml")
    parser.add_argument("--serve-config", default=None, help="Serve config whose user_config to rewrite in place")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. search.num_trials=20")
    args = parser.parse_args(argv)
    from layerexit.tuning.search import tune_command

    return tune_command(args.config, args.overrides, args.serve_config)


if __name__ == "__main__":
    sys.exit(main())
