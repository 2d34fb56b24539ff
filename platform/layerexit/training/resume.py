"""Resume on another number of ranks: decided on the driver, before any worker starts.

A run resumes from the latest checkpoint in its folder (Ray Train's ``checkpoint_manager_snapshot.json``). What in
that checkpoint depends on the number of ranks that wrote it:

- the data position: world-size free already (``TrainState.examples_in_epoch``, examples of the epoch's global
  order; states written before it existed count this rank's micro-batches and are converted with the world size
  that wrote them);
- DeepSpeed's ZeRO optimizer state (and, under ZeRO-3, the weights): one shard per rank. ``plan_resume`` converts
  it once, in a Ray task, with DeepSpeed's universal checkpoint tool (``ds_to_universal``) into
  ``deepspeed/state_universal`` beside it (built under a temporary name, renamed when complete), and the workers
  load that with ``checkpoint.load_universal``. Where conversion fails the run stops with an error naming
  ``scaling.num_workers`` and the world size that can resume it.

The step count continues as it was; a different world size with the same micro-batch and accumulation changes the
global batch, which is reported (keep it with ``optim.grad_accum``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerexit.errors import ConfigError
from layerexit.training.checkpoints import COMPLETE, DS_DIR, DS_TAG, STATE_FILE, UNIVERSAL_TAG
from layerexit.training.config import TrainConfig

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class ResumePlan:
    """How this job starts: fresh (``checkpoint`` None) or from ``checkpoint`` written by ``world_before`` ranks."""

    checkpoint: Path | None = None
    world_before: int | None = None
    world_now: int = 1
    step: int = 0
    global_batch_before: int | None = None

    @property
    def reshard(self) -> bool:
        return self.checkpoint is not None and self.world_before is not None and self.world_before != self.world_now

    def worker_config(self) -> dict[str, Any]:
        """What the workers need to know (passed in ``train_loop_config``)."""
        return {"world_before": self.world_before}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train will resume from: the snapshot's latest result, if it is complete on disk."""
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return None
    try:
        latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except json.JSONDecodeError:
        return None
    path = run_dir / latest if latest else None
    return path if path is not None and (path / COMPLETE).is_file() else None


def plan_resume(cfg: TrainConfig, saved_config: dict[str, Any] | None, console=None) -> ResumePlan:
    """Inspect the run folder; for a checkpoint written by another number of ranks, make it loadable on
    ``cfg.scaling.num_workers`` ranks (or raise ConfigError). ``saved_config``: the flat config the job recorded
    (``layerexit_mlflow.json``), which gives the world size of checkpoints older than ``TrainState.world_size``."""
    now = cfg.scaling.num_workers
    ckpt = latest_checkpoint(cfg.storage_dir() / cfg.name)
    if ckpt is None:
        return ResumePlan(world_now=now)
    raw = json.loads((ckpt / STATE_FILE).read_text())
    saved = saved_config or {}
    before = int(raw.get("world_size") or saved.get("scaling.num_workers") or now)
    mb, accum = saved.get("optim.micro_batch_size"), saved.get("optim.grad_accum")
    plan = ResumePlan(ckpt, before, now, int(raw.get("step", 0)),
                      int(mb) * int(accum) * before if mb and accum else None)
    if not plan.reshard:
        return plan
    if console is not None:
        console.print(f"resuming step {plan.step} from {ckpt.name}, written by {before} rank(s), on {now}: "
                      "resharding DeepSpeed's state (universal checkpoint)")
        if plan.global_batch_before and plan.global_batch_before != cfg.train_batch_size:
            keep = plan.global_batch_before / (cfg.optim.micro_batch_size * now)
            hint = f" (optim.grad_accum: {keep:.0f} keeps it)" if keep == int(keep) and keep >= 1 else ""
            console.print(f"note: the global batch changes from {plan.global_batch_before} to "
                          f"{cfg.train_batch_size} sequences per step{hint}")
    convert_to_universal(ckpt, before, now)
    return plan


def _convert(src: str, dst: str) -> None:
    import argparse
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)


def _fail(ckpt: Path, world_before: int, world_now: int, cause: str) -> None:
    raise ConfigError(
        f"scaling.num_workers: the checkpoint {ckpt} was written by {world_before} rank(s) and its DeepSpeed state "
        f"cannot be resharded to {world_now} ({cause})",
        f"set scaling.num_workers: {world_before} to resume it, or start a new run (a new name or "
        "checkpoint.storage_path)")


def convert_to_universal(ckpt: Path, world_before: int, world_now: int) -> Path:
    """``<ckpt>/deepspeed/state`` -> ``<ckpt>/deepspeed/state_universal`` (atomically; reused when present), in a
    Ray task so the conversion's memory is the cluster's, not the submitting process's."""
    ds_dir = ckpt / DS_DIR
    target = ds_dir / UNIVERSAL_TAG
    if target.is_dir():
        return target
    partial = ds_dir / f"{UNIVERSAL_TAG}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shards = sorted((ds_dir / DS_TAG).glob("*optim_states.pt"))
    if shards and len(shards) != world_before:  # e.g. an interrupted upload: converting would mis-shape the state
        _fail(ckpt, world_before, world_now, f"{len(shards)} optimizer shard file(s) for {world_before} rank(s)")
    import ray

    try:
        ray.get(ray.remote(num_cpus=1)(_convert).remote(str(ds_dir / DS_TAG), str(partial)))
    except Exception as err:  # noqa: BLE001 - any conversion failure becomes the named error below
        shutil.rmtree(partial, ignore_errors=True)
        _fail(ckpt, world_before, world_now,
              str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__)
    partial.rename(target)
    (ds_dir / "latest_universal").write_text(UNIVERSAL_TAG)  # the tool wrote the temporary name there
    return target
