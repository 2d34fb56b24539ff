"""Threshold search: score exit thresholds on recorded traces, search them with Ray Tune, confirm, export.

- ``config``: ``TuneSearchConfig`` (what ``tune/*.yaml`` holds).
- ``space``: the per-layer threshold search space (ranges, non-increasing constraint, optional layers).
- ``objective``: ``TraceScorer`` scores a threshold set on traces in milliseconds (expected FLOPs ratio, agreement).
- ``search``: ``run_tuning`` (the whole job) and ``run_search`` (the Ray Tune part).
- ``pareto``: the Pareto front and its plot.
- ``mlflow_tune``: nested MLflow runs per trial, thresholds tags on a registered model version.
- ``confirm``: real generation for the best candidates (the reported numbers come from it).
- ``export``: thresholds file, Serve ``user_config`` block, in-place rewrite of a Serve config.
- ``demo_stage``: the small search ``make demo`` runs.
"""
