"""ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune_draft.py --config tune/smollm2_draft.yaml

Choose the early-exit draft for lossless speculative decoding with Ray Tune: one trial per (draft layer, k =
num_speculative_tokens), scored on measured acceptance and the weight-bytes cost model, the choice measured again
on held-out prompts by our engine and by vLLM (.venv-vllm, `make vllm-env`), exported as a draft checkpoint and
written into a Serve config.
Locally: .venv/bin/python jobs/tune_draft.py --config tune/smollm2_draft.yaml \\
             --serve-config serve_configs/smollm2_vllm.yaml

Overrides are dotted key=value pairs on the YAML (e.g. space.layers=[12,24] prompts.validation.limit=4
confirm.vllm=false). Outputs (in output_dir): summary.json, report.md, trials.csv, draft_speedup.png,
draft_acceptance.png, draft-l<L>/ (the exported draft), vllm_check.json, ray_results/. With --serve-config a vLLM
Serve config gets the draft's path and num_speculative_tokens (an engine Serve config a self-speculative
user_config), in place, comments kept.

Check only (load and validate the YAML with its overrides, the layers against the model's depth from its
config.json or num_layers, the Serve config and the vLLM environment; start nothing, download nothing;
confirm.python: auto finding no vLLM on this machine is a note, not an error):
    python jobs/tune_draft.py --config tune/smollm2_draft.yaml --check
On a GPU, in the layerexit-vllm image (vLLM in the same Python: confirm.python auto):
    python jobs/tune_draft.py --config tune/llama2_7b_draft.yaml --serve-config serve_configs/7b.yaml

A config with `draft: eagle3` (tune/smollm2_eagle3.yaml) searches the EAGLE-3 draft a model ships instead: one
trial per (draft vocabulary size N, k), teacher-forced acceptance on the search prompts, the choice decoded by our
engine and by vLLM (method eagle3), exported (a pruned head to output_dir/eagle3-N) and written into the Serve config:
    .venv/bin/python jobs/tune_draft.py --config tune/smollm2_eagle3.yaml --serve-config serve_configs/smollm2_vllm.yaml

Exit status: 0 done (or valid, with --check); 2 bad input (one line on stderr); 3 the best draft's predicted
speedup is below export.min_speedup; 4 the vLLM confirmation failed (in both the draft and the report are still
written to output_dir and the Serve config is left unchanged).
"""

from __future__ import annotations

import argparse
import sys


def check(config: str, overrides: list[str], serve_config: str | None) -> int:
    """--check: what ``run_draft_tuning`` validates before it starts Ray, and nothing else."""
    from layerexit.config import load_config
    from layerexit.errors import LayerexitError
    from layerexit.tuning.draft_config import DraftTuneConfig
    from layerexit.tuning.draft_search import model_depth_of, preflight

    notes: list[str] = []
    try:
        cfg = load_config(DraftTuneConfig, config, list(overrides))
        preflight(cfg, serve_config or cfg.export.serve_config, notes)
        depth = model_depth_of(cfg.model.spec, cfg.model.num_layers)
        if depth is not None:
            cfg.space.check(depth)
        else:
            notes.append(f"the depth of {cfg.model.spec} is not known offline: space.layers are checked when the job "
                         "loads it (set num_layers to check them now)")
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"config {config} is valid: model {cfg.model.spec} ({depth or '?'} layers), draft layers "
          f"{cfg.space.layers}, k {cfg.space.ks[0]}..{cfg.space.ks[-1]}: {cfg.space.size} trials; vLLM confirmation "
          f"{'on (' + cfg.confirm.python + ')' if cfg.confirm.vllm else 'off'}")
    for note in notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="draft search YAML, e.g. tune/smollm2_draft.yaml")
    parser.add_argument("--serve-config", default=None,
                        help="Serve config to point at the chosen draft, in place (default: export.serve_config)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, overrides, Serve config and vLLM env, then exit (starts nothing)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. space.layers=[12,24]")
    args = parser.parse_args(argv)
    from layerexit.tuning.eagle3_search import is_eagle3_config

    if is_eagle3_config(args.config):  # draft: eagle3 -- the model's shipped EAGLE-3 draft: k and N
        from layerexit.tuning.eagle3_search import eagle3_command

        return eagle3_command(args.config, args.overrides, args.serve_config, check_only=args.check)
    if args.check:
        return check(args.config, args.overrides, args.serve_config)
    from layerexit.tuning.draft_search import draft_command

    return draft_command(args.config, args.overrides, args.serve_config)


if __name__ == "__main__":
    sys.exit(main())
