"""LITE fine-tuning on Ray Train + DeepSpeed, tracked in MLflow.

Launch:  ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_lite.py --config jobs/configs/smollm2_lite.yaml

Without a cluster (starts a local Ray instance):  python jobs/train_lite.py --config jobs/configs/smollm2_lite.yaml

Overrides are key=value pairs after the options, e.g.  optim.max_steps=20 scaling.num_workers=1 name=try1
Check only (config + overrides validated against the model's depth and the data, nothing started; exit 0, or 2
with the field named):  python jobs/train_lite.py --config jobs/configs/llama2_7b_lite.yaml --check
Running again with the same name and checkpoint.storage_path resumes from the latest checkpoint.
MLflow: mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the job's working directory.
Under `ray job submit --working-dir .` that directory is Ray's copy of yours, so to see runs with `mlflow ui` where
you are, pass  mlflow.tracking_uri=sqlite:///$PWD/mlflow.db  (or set MLFLOW_TRACKING_URI via --runtime-env-json).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from layerexit.errors import LayerexitError


def _sigterm_to_exit(signum, frame):  # `ray job stop` sends SIGTERM: end the MLflow run as KILLED
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config YAML (jobs/configs/*.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the config against model and data, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-5")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    from rich.console import Console

    from layerexit.training import load_train_config

    console = Console()
    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.check:
            print(f"config {args.config} is valid: {cfg.name}, {cfg.model.spec}, exits {cfg.lite.exit_layers}")
            return 0
        if not cfg.scaling.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from layerexit.training import run_training

        result = run_training(cfg, console=console)
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.print(f"MLflow run {result.run_id} ({result.tracking_uri}); checkpoint {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
