"""Ray Train (V2) + DeepSpeed wiring for LITE fine-tuning, tracked in MLflow.

Driver (``run_training``): validate the config against the model and data, prepare the tokenized data (self-distill
when needed), open the MLflow run, start a ``TorchTrainer``; at the end log and register the model.
Worker (``train_worker``): load the model, ``deepspeed.initialize``, resume from ``ray.train.get_checkpoint()``,
run ``training.loop.train_loop``; rank 0 logs metrics and figures to the driver's MLflow run; every rank takes
part in checkpoints (``ray.train.report``) and evaluation.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerexit.data.datasets import PreparedData
from layerexit.deploy.cluster import package_runtime_env
from layerexit.errors import ConfigError
from layerexit.training.config import TrainConfig, check_registered_depth, validate_train_config
# What the driver prepares before any worker starts, and the DeepSpeed setup of each worker (re-exported here).
from layerexit.training.data_prep import prepare_training_data
from layerexit.training.deepspeed_setup import build_optimizer, deepspeed_config
from layerexit.training.loop import steps_per_epoch

RUN_INFO_FILE = "layerexit_mlflow.json"
FAULT_STEP_ENV = "LAYEREXIT_FAULT_STEP"  # tests: SIGKILL one worker at this step, once
FAULT_MARKER_ENV = "LAYEREXIT_FAULT_MARKER"  # file created when the fault fired (so it fires once)
FAULT_RANK_ENV = "LAYEREXIT_FAULT_RANK"
FAULT_DELAY_ENV = "LAYEREXIT_FAULT_DELAY_S"  # wait first, so the controller has registered the latest checkpoint


@dataclass
class TrainResult:
    """What a finished training job produced."""

    name: str
    run_id: str
    tracking_uri: str
    checkpoint_dir: Path
    hf_model_dir: Path
    metrics: dict[str, Any]
    registered: dict[str, Any] | None = None
    alignment_before: dict[int, float] = field(default_factory=dict)
    alignment_after: dict[int, float] = field(default_factory=dict)
    eval_loss_before: dict[int, float] = field(default_factory=dict)
    eval_loss_after: dict[int, float] = field(default_factory=dict)
    wall_s: float = 0.0


# ============================================================================================ driver side


def _log(console, text: str) -> None:
    if console is not None:
        console.print(text)


def total_steps(cfg: TrainConfig, num_train: int) -> int:
    per_epoch = steps_per_epoch(num_train, cfg.optim.micro_batch_size, cfg.scaling.num_workers, cfg.optim.grad_accum)
    if per_epoch < 1:
        raise ConfigError(
            f"optim.micro_batch_size: {num_train} training examples do not fill one global batch of "
            f"{cfg.train_batch_size} (micro_batch_size * grad_accum * scaling.num_workers)",
            "lower the batch settings or use more data",
        )
    steps = per_epoch * cfg.optim.epochs
    return min(steps, cfg.optim.max_steps) if cfg.optim.max_steps else steps


def _worker_env(cfg: TrainConfig) -> dict[str, str]:
    # MALLOC_*: glibc allocator tuning (e.g. MALLOC_MMAP_THRESHOLD_, so freed tensors leave the RSS figures).
    # NCCL_*: the collective settings of docs/gpu.md (interfaces, InfiniBand, debug) reach every rank.
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("LAYEREXIT_", "HF_", "TRANSFORMERS_", "MALLOC_", "NCCL_"))}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints appear once in the driver's output
    # The workers' RunLogger retries and then drops a call (never kills training); MLflow's own HTTP retries
    # (7, exponential, up to minutes per call) would stall the step on top of that.
    env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"))
    env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"))
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _run_info_path(cfg: TrainConfig) -> Path:
    return cfg.storage_dir() / cfg.name / RUN_INFO_FILE


# Settings a resumed run may change (how long, how often, where it logs); any other difference means the
# checkpoints in the folder belong to another experiment.
RESUMABLE_PREFIXES = ("optim.max_steps", "optim.max_minutes", "optim.epochs", "eval.", "checkpoint.", "mlflow.", "scaling.")


def _run_info(cfg: TrainConfig) -> dict:
    """What the job recorded in its checkpoint folder (run id, tracking URI, config), or {} if nothing readable."""
    path = _run_info_path(cfg)
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def check_resume_compatible(cfg: TrainConfig) -> None:
    """A job whose checkpoint folder (``checkpoint.storage_path``/``name``) holds another config's run would
    resume it (Ray Train restores the latest checkpoint, MLflow the run): a clear error instead, before any
    data preparation or worker, naming what differs. Folders written before the config was recorded pass."""
    saved = _run_info(cfg).get("config")
    if not isinstance(saved, dict):
        return
    now = cfg.flat_params()
    # A key the saved config lacks is a setting added since that run was written: not a difference.
    differ = sorted(k for k in saved if saved.get(k) != now.get(k) and not k.startswith(RESUMABLE_PREFIXES))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in differ[:5])
        more = f" (+{len(differ) - 5} more)" if len(differ) > 5 else ""
        raise ConfigError(
            f"checkpoint.storage_path: {_run_info_path(cfg).parent} holds a run of a different config, which this "
            f"job would resume ({shown}{more})",
            "pass a new checkpoint.storage_path or name to start a new run, or delete that folder to start over")


def _previous_run_id(cfg: TrainConfig, tracking_uri: str) -> str | None:
    info = _run_info(cfg)
    return info.get("run_id") if info.get("tracking_uri") == tracking_uri else None


def _metric_series(tracking_uri: str, run_id: str, prefix: str) -> tuple[dict[int, float], dict[int, float]]:
    """First and last value of every ``<prefix><layer>`` metric (e.g. align/l08) in a run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    first, last = {}, {}
    for key in run.data.metrics:
        if not key.startswith(prefix):
            continue
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        if hist:
            layer = int(key[len(prefix):])
            first[layer], last[layer] = hist[0].value, hist[-1].value
    return dict(sorted(first.items())), dict(sorted(last.items()))


def check_cluster(cfg: TrainConfig, ray_init_kwargs: dict[str, Any] | None = None) -> bool:
    """Start (or attach to) Ray and fail fast when a multi-node run has node-local tracking or storage.
    Returns whether the run spans several nodes (then the package travels to every node as ``py_modules``)."""
    import ray

    from layerexit.deploy.cluster import alive_nodes, check_multi_node, is_multi_node
    from layerexit.tracking import resolve_tracking_uri

    if not ray.is_initialized():
        ray.init(**(ray_init_kwargs or {}))
    nodes = ray.nodes()
    per_worker = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1.0} if cfg.scaling.use_gpu else {})}
    multi = is_multi_node(nodes, cfg.scaling.num_workers, per_worker)
    check_multi_node(resolve_tracking_uri(cfg.mlflow.tracking_uri), cfg.checkpoint.storage_path, multi_node=multi,
                     num_nodes=len(alive_nodes(nodes)))
    return multi


def _auto_reason(cfg: TrainConfig) -> str:
    """Why ``precision: auto`` resolved as it did on this machine (empty for an explicit precision)."""
    if cfg.deepspeed.precision != "auto":
        return ""
    from layerexit.machine import choose_dtype

    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    return f" (precision auto: {choose_dtype('train', 'auto', device, log=False).reason})"


FINISH_RESERVE_S = 300.0  # optim.max_minutes: what the last evaluation, checkpoint, shipping and registration take


def training_deadline(cfg: TrainConfig, started: float) -> float | None:
    """``optim.max_minutes`` as an absolute time for the workers (None: no budget): the job's start plus the budget,
    less a reserve for what follows the last step."""
    if cfg.optim.max_minutes is None:
        return None
    return started + 60.0 * cfg.optim.max_minutes - FINISH_RESERVE_S


def run_training(cfg: TrainConfig, *, console=None, show_progress: bool = True,
                 ray_init_kwargs: dict[str, Any] | None = None) -> TrainResult:
    """Validate, prepare data, train on Ray Train + DeepSpeed, log to MLflow, register the model."""
    t0 = time.time()
    depth = validate_train_config(cfg)  # user errors surface here, before Ray or any worker starts
    depth = check_registered_depth(cfg, depth)  # an MLflow base model: fetched now, its depth checked
    multi_node = check_cluster(cfg, ray_init_kwargs)  # and these, before data preparation and workers
    check_resume_compatible(cfg)
    import ray

    from layerexit.training.rank_memory import check_training_memory
    from layerexit.training.resume import plan_resume

    memory_plan = check_training_memory(cfg, ray.nodes(), console)  # a run that cannot fit stops here
    resume = plan_resume(cfg, _run_info(cfg).get("config"), console)  # another world size: resharded here
    data = prepare_training_data(cfg, show_progress=show_progress)
    data.eval_prompts = data.eval_prompts[: cfg.eval.alignment_prompts]
    from layerexit.training import recipes

    recipes.add_sampled_examples(cfg, data, show_progress=show_progress)
    from layerexit.training import eagle3_recipe

    eagle3_recipe.add_extra_sources(cfg, data, show_progress=show_progress)  # data.magpie_prompts, data.text_tokens
    eagle3_worker: dict[str, Any] = {}
    if cfg.recipe == "eagle3":  # the cache over every position, with the aux layers' features; the draft vocabulary
        cache, eagle3_worker = eagle3_recipe.prepare_eagle3(cfg, data, depth, console)
    else:
        cache = recipes.prepare_teacher(cfg, data, console) if cfg.recipe != "lite" else None
    steps = (total_steps(cfg, len(data.train)) if cfg.recipe != "adapters" or recipes.trains_on_sequences(cfg)
             else recipes.steps_for_cache(cfg, cache))
    if not data.eval:
        raise ConfigError("data: the held-out split is empty", "raise data.eval_fraction or add data")

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from layerexit import tracking

    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    storage = cfg.storage_dir()
    storage.mkdir(parents=True, exist_ok=True)
    precision = cfg.resolve_precision()  # `auto` is logged with its reason (layerexit.machine)
    _log(console, f"[bold]{cfg.name}[/] ({cfg.recipe}): {cfg.model.spec} ({depth} layers), exits {cfg.lite.exit_layers} + {depth}, "
                  f"weights {cfg.lite.weights}; {len(data.train)} train / {len(data.eval)} eval examples; "
                  f"{steps} steps of {cfg.train_batch_size} sequences; {cfg.scaling.num_workers} workers, "
                  f"ZeRO-{cfg.deepspeed.zero_stage}, {precision}{_auto_reason(cfg)}")
    _log(console, f"MLflow: {uri} (experiment {cfg.mlflow.experiment}); checkpoints: {storage / cfg.name}")

    if not ray.is_initialized():
        ray.init(**(ray_init_kwargs or {}))
    data_ref = ray.put(data)
    previous = _previous_run_id(cfg, uri)
    with tracking.tracked_run(cfg.mlflow.experiment, run_name=cfg.name, tracking_uri=uri, run_id=previous,
                              tags={"layerexit.job": "train_lite", "layerexit.model": cfg.model.spec},
                              log_system_metrics=cfg.mlflow.log_system_metrics) as run:
        (storage / cfg.name).mkdir(parents=True, exist_ok=True)
        params = cfg.flat_params()
        _run_info_path(cfg).write_text(json.dumps({"run_id": run.run_id, "tracking_uri": uri, "config": params}))
        run.log_params({**params, "derived.num_layers": depth, "derived.total_steps": steps,
                        "derived.train_batch_size": cfg.train_batch_size, "derived.train_examples": len(data.train),
                        "derived.eval_examples": len(data.eval), "derived.precision": precision})
        from layerexit.machine import describe_machine, machine_line

        run.set_tags({"layerexit.precision": precision, "layerexit.machine": machine_line(describe_machine())})
        run.log_dict(data.info, "data_info.json")
        if cache is not None:
            run.log_metrics({"teacher_cache/size_mib": cache.meta["size_bytes"] / 2**20,
                             "teacher_cache/build_s": cache.meta["build_s"],
                             "teacher_cache/positions": cache.num_positions,
                             "teacher_cache/mean_topk_mass": cache.meta.get("mean_topk_mass", 0.0)})
            run.log_dict(cache.meta, "teacher_cache.json")
        run.log_dict(deepspeed_config(cfg), "deepspeed_config.json")
        if memory_plan is not None:
            run.log_metrics(memory_plan.as_metrics())
        if resume.reshard:
            run.set_tags({f"layerexit.resumed_world_size.step{resume.step}": f"{resume.world_before}->{resume.world_now}"})
        if previous:
            _log(console, f"resuming MLflow run {run.run_id}")
        resources = {"CPU": cfg.scaling.cpus_per_worker}
        if cfg.scaling.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "data_ref": data_ref, "total_steps": steps,
                               "num_layers": depth, "run_id": run.run_id, "tracking_uri": uri,
                               "cache_dir": str(cache.path) if cache is not None else None, **eagle3_worker,
                               "deadline": training_deadline(cfg, t0),
                               **resume.worker_config()},
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            run_config=RunConfig(
                name=cfg.name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                worker_runtime_env=package_runtime_env(_worker_env(cfg), multi_node=multi_node),
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        ckpt_dir = Path(result.checkpoint.path)
        from layerexit.training.checkpoints import hf_model_dir

        hf_dir = hf_model_dir(ckpt_dir)
        if cfg.recipe == "eagle3":  # before registering: the draft length from measured held-out acceptance
            eagle3_recipe.ship_eagle3(cfg, hf_dir, data, run, console)
        if cfg.draft.choose:  # before registering, so the registered model carries its draft settings
            from layerexit.training.draft_stage import choose_and_ship_draft

            choose_and_ship_draft(cfg, hf_dir, data, run, console)
        registered = None
        if cfg.mlflow.register_model:
            registered = tracking.log_hf_model(hf_dir, cfg.registered_model_name, cfg.mlflow.alias)
            if cfg.recipe == "adapters":  # also the small artifact on its own, beside the registered model
                from layerexit.models.adapters import ADAPTERS_DIR

                run.log_artifacts(hf_dir / ADAPTERS_DIR, ADAPTERS_DIR)
            if cfg.recipe == "eagle3":  # the vLLM EAGLE-3 checkpoint on its own too
                run.log_artifacts(hf_dir / eagle3_recipe.EAGLE3_DIR, eagle3_recipe.EAGLE3_DIR)
            _log(console, f"registered {registered['registered_name']} version {registered['version']} "
                          f"(alias {registered['alias']})")
        run.set_tags({"layerexit.checkpoint": str(ckpt_dir)})
        before, after = _metric_series(uri, run.run_id, "align/l")
        loss_before, loss_after = _metric_series(uri, run.run_id, "eval/loss_l")
        metrics = dict(result.metrics or {})
    out = TrainResult(cfg.name, run.run_id, uri, ckpt_dir, hf_dir, metrics, registered, before, after,
                      loss_before, loss_after, time.time() - t0)
    _log(console, f"done in {out.wall_s:.0f} s; model: {hf_dir}")
    return out


# ============================================================================================ worker side


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Test hook: SIGKILL this worker at ``$LAYEREXIT_FAULT_STEP`` once (a real crash, no cleanup).

    It first waits ``$LAYEREXIT_FAULT_DELAY_S`` (default 6 s, three Ray Train controller polls): a checkpoint counts
    once the controller has registered it, and a crash right after a report would otherwise resume from the one
    before (correct, but not what a test of "resume from the latest" wants to see)."""
    target = os.environ.get(FAULT_STEP_ENV)
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not target or not marker or int(target) != step:
        return
    if rank != int(os.environ.get(FAULT_RANK_ENV, "1")) or Path(marker).exists():
        return
    time.sleep(float(os.environ.get(FAULT_DELAY_ENV, "6")))
    Path(marker).write_text(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def rank0_inference_copy(engine, hf, device, rank: int):
    """Under ZeRO-3: a plain, full copy of the model on rank 0 (``None`` elsewhere), for generation.

    Collective: every rank must call it. The weights are gathered one module at a time
    (``_zero3_consolidated_16bit_state_dict``: each module's shards are all-gathered, copied to rank 0's CPU and
    released), so ranks other than 0 never hold more than one module's full weights, unlike gathering every
    parameter on every rank at once. Rank 0 then holds one 16-bit copy (CPU dict -> its device) while it generates.
    """
    import torch

    state = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return None
    prefix = "model." if hf is not engine.module else ""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        copy = type(hf)(hf.config)
    copy.load_state_dict(state, strict=False, assign=True)
    for name, buf in hf.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        owner, _, attr = name.rpartition(".")
        copy.get_submodule(owner).register_buffer(attr, buf.detach().clone(), persistent=False)
    if getattr(hf.config, "tie_word_embeddings", False):
        copy.get_output_embeddings().weight = copy.get_input_embeddings().weight
    left = [n for n, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"ZeRO-3 inference copy: no weights for {left[:5]}")
    return copy.to(device).eval()


def _log_load_memory(report, rank: int, world: int, logger, step: int) -> None:
    """Every rank's measured load cost, gathered to rank 0: printed, and logged as ``memory/rank<r>_*`` plus the
    max over ranks (what decides whether a node fits). Collective."""
    import torch.distributed as dist

    mine = {**report.as_metrics(), **{f"memory/{k}": v for k, v in report.extra.items()}}
    rows = [mine]
    if world > 1 and dist.is_initialized():
        rows = [None] * world
        dist.all_gather_object(rows, mine)
    if logger is None:
        return
    metrics = {f"{k.replace('memory/', f'memory/rank{r}_')}": v for r, row in enumerate(rows) for k, v in row.items()}
    metrics.update({f"{k}_max": max(row[k] for row in rows) for k in mine})
    logger.log_metrics(metrics, step=step)
    logger.set_tags({"layerexit.zero3_sharded_init": report.sharded})
    params = ", ".join(f"{row['memory/params_mib']:.0f}" for row in rows)
    peaks = ", ".join(f"{row['memory/load_peak_mib']:.0f}" for row in rows)
    how = f"ZeRO-3 sharded over {world} ranks" if report.sharded else "a full copy per rank"
    print(f"[layerexit] model loaded as {how}: parameters per rank {params} MiB; load peak (anonymous RSS growth) "
          f"per rank {peaks} MiB", flush=True)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop (one per rank)."""
    cfg = TrainConfig.model_validate(config["config"])
    if not cfg.scaling.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from layerexit.evaluation.alignment import AlignmentReport, LayerAlignment, plot_alignment
    from layerexit.losses import exit_weights
    from layerexit.tracking import RunLogger
    from layerexit.training import checkpoints as ckpts
    from layerexit.training.loop import (
        FrozenTeacher, LiteObjective, LoopCallbacks, LoopSettings, TrainState, alignment_metrics, epoch_batches,
        eval_batches, eval_loss_metrics, lr_lambda, param_groups, sharded_alignment, train_loop,
    )

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.optim.seed)
    data: PreparedData = ray.get(config["data_ref"])
    steps, depth = int(config["total_steps"]), int(config["num_layers"])
    precision = cfg.resolve_precision()  # on this worker's machine (logged when `auto`)
    from layerexit.training.sharded_load import load_for_training, load_teacher

    ds_config = deepspeed_config(cfg)
    checkpoint = ray.train.get_checkpoint()
    written_by = world
    if checkpoint is not None:  # which ranks wrote it decides how DeepSpeed must load it (training.resume)
        with checkpoint.as_directory() as ckpt_dir:
            raw_state = json.loads((Path(ckpt_dir) / ckpts.STATE_FILE).read_text())
        written_by = int(raw_state.get("world_size") or config.get("world_before") or world)
    universal = written_by != world
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    # Under ZeRO-3 the model is built sharded (zero.Init): no rank ever holds a full copy. zero.Init reads the world
    # size from deepspeed.comm, which wraps Ray Train's process group once initialised.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    model, tokenizer, load_report = load_for_training(
        cfg.model.spec, torch.bfloat16 if precision == "bf16" else torch.float32, ds_config)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    weights = exit_weights(cfg.lite.exit_layers, depth, cfg.lite.weights)
    from layerexit.training import recipes

    cache = None
    if cfg.recipe == "adapters" and cfg.adapters.kind == "decoder_layer":
        from layerexit.models.adapters import build_decoder_adapters
        from layerexit.models.exits import attach_exit_adapters

        adapters = build_decoder_adapters(model, cfg.lite.exit_layers, cfg.adapters.num_layers, cfg.adapters.init)
        objective = recipes.DecoderAdapterObjective(model, adapters, weights, cfg.distill.temperature,
                                                    cfg.distill.full_every, cfg.distill.chunk_size)
        attach_exit_adapters(model, objective.adapter_map())  # eval and alignment see the exits as trained
    elif cfg.recipe == "adapters":
        from layerexit.data.teacher_cache import read_cache
        from layerexit.models.adapters import build_adapters
        from layerexit.models.exits import attach_exit_adapters

        cache = read_cache(config["cache_dir"])
        adapters = build_adapters(cfg.lite.exit_layers, model.config.hidden_size, cfg.adapters.rank,
                                  getattr(model.config, "rms_norm_eps", 1e-6))
        objective = recipes.AdapterObjective(model, adapters, weights, cfg.distill.temperature,
                                             cfg.distill.full_every, cfg.distill.chunk_size)
        attach_exit_adapters(model, objective.adapter_map())  # eval and alignment see the exits as trained
    elif cfg.recipe == "eagle3":
        from layerexit.data.teacher_cache import read_cache
        from layerexit.training import eagle3_recipe

        e3_cache = read_cache(config["cache_dir"])
        e3_rows = eagle3_recipe.sequence_rows(e3_cache, len(data.train))
        draft = eagle3_recipe.new_draft(model, config["eagle3_aux_layers"], config["eagle3_vocab"],
                                        target=config.get("eagle3_target"), seed=cfg.optim.seed)
        objective = eagle3_recipe.Eagle3Objective(model, draft, cfg.eagle3.ttt_steps, cfg.eagle3.step_decay,
                                                  cfg.distill.temperature)
    elif cfg.recipe == "distill":
        objective = recipes.DistillObjective(model, weights, cfg.distill.temperature, cfg.distill.full_every,
                                             cfg.distill.chunk_size, cfg.distill.anchor_weight)
    else:
        objective = LiteObjective(model, weights, cfg.lite.chunk_size, cfg.lite.distill_weight,
                                  cfg.lite.anchor_weight)
    teacher = None
    if cfg.recipe == "lite" and cfg.lite.anchor_weight > 0:
        t_model, teacher_report = load_teacher(cfg.model.spec, torch.float32 if precision == "fp32" else torch.bfloat16,
                                               ds_config, device)
        teacher = FrozenTeacher(t_model)
        load_report.extra["teacher_params_mib"] = teacher_report.param_bytes / 2**20

    warmup = max(cfg.optim.warmup_steps, int(cfg.optim.warmup_ratio * steps))
    optimizer = build_optimizer(cfg, param_groups(objective, cfg.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps, warmup, cfg.optim.schedule, cfg.optim.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    zero_stage = cfg.deepspeed.zero_stage

    state = TrainState()
    start_report: AlignmentReport | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = ckpts.read_train_state(ckpt_dir, examples_per_micro=cfg.optim.micro_batch_size * written_by)
            ckpts.load_engine_state(engine, ckpt_dir, universal=universal)
        if raw_state.get("start_alignment"):  # the same trainer_state.json, read before loading the model
            raw = raw_state["start_alignment"]
            start_report = AlignmentReport(**{**raw, "rows": [LayerAlignment(**r) for r in raw["rows"]]})
        state.resumed_from_step = state.step
        if rank == 0:
            how = f" (written by {written_by} ranks, resharded to {world})" if universal else ""
            print(f"[layerexit] resumed from checkpoint at step {state.step}, example {state.examples_in_epoch} of "
                  f"epoch {state.epoch}{how}", flush=True)

    # Retries, then drops a call with a warning: an MLflow outage must not kill training (the run falls back to its
    # last checkpoint otherwise).
    logger = RunLogger(config["run_id"], config["tracking_uri"], on_error="warn") if rank == 0 else None
    if logger is not None:
        logger.set_tags({"layerexit.precision.worker": precision})
        print(f"[layerexit] precision {precision}{_auto_reason(cfg)}", flush=True)
    if logger is not None and state.resumed_from_step is not None:
        logger.log_metrics({"resumed_from_step": state.resumed_from_step}, step=state.step)
    _log_load_memory(load_report, rank, world, logger, state.step)
    hf = objective.model
    eval_layers = sorted(cfg.eval.layers or {*cfg.lite.exit_layers, depth})
    pad_id = tokenizer.pad_token_id
    ev_batches = eval_batches(data.eval, micro_batch=cfg.optim.micro_batch_size, world=world, rank=rank,
                              pad_id=pad_id, device=device)
    from layerexit.engine.reference import eos_ids

    eos = eos_ids(hf, tokenizer)
    autocast = precision == "autocast_bf16"

    def on_log(st: TrainState, metrics: dict[str, float]) -> None:
        if logger is not None:
            logger.log_metrics(metrics, step=st.step)
            exits = " ".join(f"l{l}={metrics[f'train/loss_l{l:02d}']:.3f}" for l in sorted(weights)
                             if f"train/loss_l{l:02d}" in metrics)
            if cfg.recipe == "eagle3":  # per unrolled step: loss and top-1 agreement with the teacher
                exits = " ".join(f"s{k[len('train/ttt_loss_s'):]}={v:.3f}/{metrics.get(k.replace('loss', 'acc'), 0):.0%}"
                                 for k, v in sorted(metrics.items()) if k.startswith("train/ttt_loss_s"))
            print(f"[layerexit] step {st.step}/{steps} loss {metrics['train/loss']:.4f} ({exits}) "
                  f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s", flush=True)
        _maybe_inject_fault(st.step, rank)

    def alignment_report() -> AlignmentReport | None:
        if zero_stage != 3:
            return sharded_alignment(hf, data.eval_prompts, cfg.eval.alignment_max_new_tokens, pad_id, eos)
        # ZeRO-3: generation stops at EOS, so ranks would run different numbers of forwards and the per-module
        # all-gathers would not match. Rank 0 generates alone on a copy gathered module by module.
        copy = rank0_inference_copy(engine, hf, device, rank)
        report = None
        if copy is not None:
            from layerexit.engine.reference import hf_greedy_generate_batched
            from layerexit.evaluation.alignment import alignment_from_generations

            prompts = [list(p) for p in data.eval_prompts]
            responses = hf_greedy_generate_batched(copy, prompts, cfg.eval.alignment_max_new_tokens, pad_id,
                                                   eos=eos, show_progress=False)
            report = alignment_from_generations(copy, prompts, responses, show_progress=False)
            del copy
        if world > 1:
            box = [report]
            torch.distributed.broadcast_object_list(box, src=0)
            report = box[0]
        return report

    e3_heldout = None
    if cfg.recipe == "eagle3" and rank == 0:  # the target's features on held-out answers, computed once
        e3_heldout = eagle3_recipe.heldout_features(hf, data.eval[: cfg.eagle3.eval_prompts],
                                                    objective.draft.spec.aux_layers)

    def on_eval_eagle3(st: TrainState) -> dict[str, float]:
        """Held-out acceptance per draft position and tau (rank 0 alone: the draft is whole on every rank)."""
        if e3_heldout is None:
            return {}
        acc = eagle3_recipe.draft_acceptance(objective.draft, e3_heldout, cfg.eagle3.max_draft)
        metrics = acc.metrics()
        if logger is not None:
            logger.log_metrics(metrics, step=st.step)
            logger.log_dict(acc.to_dict(), f"eagle3/acceptance_step{st.step:06d}.json")
            print(f"[layerexit] eval step {st.step}: eagle3 acceptance by position "
                  + " ".join(f"{a:.0%}" for a in acc.per_position) + "; tau "
                  + " ".join(f"k{k}={t:.2f}" for k, t in acc.tau.items()), flush=True)
        return metrics

    def on_eval(st: TrainState) -> dict[str, float]:
        nonlocal start_report
        if cfg.recipe == "eagle3":
            return on_eval_eagle3(st)
        engine.eval()
        with torch.no_grad():
            # Under ZeRO-3 the fetch hooks stay on: each module is gathered when it runs and released after, and
            # every rank makes the same calls (equal batch counts and widths, no skipped chunks).
            metrics = eval_loss_metrics(hf, ev_batches, eval_layers, weights, cfg.lite.chunk_size, autocast)
            report = None
            if cfg.eval.alignment_prompts and data.eval_prompts:
                report = alignment_report()
        engine.train()
        metrics.update(alignment_metrics(report, eval_layers))
        if report is not None and start_report is None and st.step == 0:
            start_report = report
        if logger is not None:
            logger.log_metrics(metrics, step=st.step)
            if report is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    reports = {"start": start_report} if start_report is not None and st.step > 0 else {}
                    reports[f"step {st.step}"] = report
                    png = plot_alignment(reports, Path(tmp) / f"alignment_step{st.step:06d}.png",
                                         highlight_layers=[l for l in eval_layers if l != depth][:6] or None)
                    logger.log_artifact(png, "alignment")
                    from layerexit.evaluation.mlflow_report import log_overview_png

                    log_overview_png(logger, png, "figure5_alignment")  # the latest, first in the artifact tree
                    logger.log_dict(report.to_dict(), f"alignment/alignment_step{st.step:06d}.json")
            shown = " ".join(f"l{l}={metrics[f'align/l{l:02d}']:.0%}" for l in eval_layers
                             if l != depth and f"align/l{l:02d}" in metrics)
            print(f"[layerexit] eval step {st.step}: loss {metrics['eval/loss']:.4f}"
                  + (f"; alignment {shown}" if shown else ""), flush=True)
        return metrics

    def on_checkpoint(st: TrainState, metrics: dict[str, float]) -> None:
        name = f"checkpoint_{st.step:06d}"
        extra = {"start_alignment": start_report.to_dict() if start_report is not None else None}
        with tempfile.TemporaryDirectory(prefix="layerexit-ckpt-") as tmp:
            target = ckpts.write_checkpoint(engine, tokenizer, Path(tmp) / name, st, zero_stage=zero_stage,
                                            rank=rank, extra=extra)
            if cfg.recipe == "adapters" and rank == 0:
                recipes.save_checkpoint_adapters(objective, ckpts.hf_model_dir(target), tokenizer)
            if cfg.recipe == "eagle3" and rank == 0:  # vLLM's EAGLE-3 layout beside the (unchanged) base model
                from layerexit.models.eagle3 import save_eagle3

                save_eagle3(objective.draft, ckpts.hf_model_dir(target) / eagle3_recipe.EAGLE3_DIR)
            report_metrics = {k: float(v) for k, v in metrics.items()}
            report_metrics.update({"step": st.step, "epoch": st.epoch,
                                   "resumed_from_step": -1 if st.resumed_from_step is None else st.resumed_from_step})
            ray.train.report(report_metrics, checkpoint=ray.train.Checkpoint.from_directory(str(target)),
                             checkpoint_dir_name=name)

    def batches(epoch: int, skip: int):
        if cfg.recipe == "eagle3":
            return eagle3_recipe.eagle3_epoch_batches(
                data.train, e3_rows, e3_cache, objective.draft.spec.aux_layers, micro_batch=cfg.optim.micro_batch_size,
                world=world, rank=rank, grad_accum=cfg.optim.grad_accum, epoch=epoch, seed=cfg.optim.seed,
                pad_id=pad_id, skip=skip, group_size=cfg.data.length_group_size if cfg.data.group_by_length else 0,
                device=device)
        if cache is not None:
            return recipes.cache_epoch_batches(cache, sorted(objective.weights), positions=cfg.adapters.positions_per_batch,
                                               world=world, rank=rank, grad_accum=cfg.optim.grad_accum, epoch=epoch,
                                               seed=cfg.optim.seed, skip=skip, device=device)
        return epoch_batches(data.train, micro_batch=cfg.optim.micro_batch_size, world=world, rank=rank,
                             grad_accum=cfg.optim.grad_accum, epoch=epoch, seed=cfg.optim.seed, pad_id=pad_id,
                             skip=skip, device=device,
                             group_size=cfg.data.length_group_size if cfg.data.group_by_length else 0)

    settings = LoopSettings(total_steps=steps, log_every=cfg.mlflow.log_every_steps, eval_every=cfg.eval.every_steps,
                            eval_at_start=cfg.eval.at_start, checkpoint_every=cfg.checkpoint.every_steps,
                            autocast=autocast, deadline=config.get("deadline"))
    train_loop(engine, batches, settings, state, LoopCallbacks(on_log, on_eval, on_checkpoint), teacher)
