"""Training checkpoints (no Ray imports): a plain Hugging Face model directory plus DeepSpeed's resume state.

Layout of one checkpoint (the merge of every rank's directory)::

    hf_model/            config.json, model.safetensors, tokenizer files: loads with plain transformers
    deepspeed/latest     DeepSpeed engine state (module, optimizer shards per rank, LR scheduler)
    deepspeed/state/...
    deepspeed/state_universal/  only after a resume on another number of ranks (training.resume)
    trainer_state.json   TrainState (step, epoch, position in the epoch, tokens)
    COMPLETE             written last by rank 0

Every rank builds its part in ``<dir>.partial`` and renames it to ``<dir>`` when done, so a crash never leaves a
half-written directory that looks finished; Ray Train registers a checkpoint only after all ranks uploaded it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from layerexit.errors import LayerexitError
from layerexit.training.loop import TrainState

HF_DIR = "hf_model"
DS_DIR = "deepspeed"
DS_TAG = "state"
UNIVERSAL_TAG = "state_universal"  # DeepSpeed's universal checkpoint of DS_TAG (resume on another world size)
STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"


def _hf_module(engine) -> nn.Module:
    module = engine.module
    return module.model if hasattr(module, "model") and hasattr(module, "weights") else module


def save_hf_model(engine, tokenizer, directory: Path, zero_stage: int, rank: int) -> None:
    """Save the model as a plain HF directory from rank 0. Under ZeRO-3 every rank must call this (the weights
    are gathered collectively); otherwise only rank 0 does work."""
    hf = _hf_module(engine)
    state_dict = None
    if zero_stage == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # collective; the full dict on rank 0 only
        if rank == 0:
            prefix = "model." if hf is not engine.module else ""
            state_dict = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if rank != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_checkpoint(engine, tokenizer, target: Path, state: TrainState, *, zero_stage: int, rank: int,
                     extra: dict | None = None) -> Path:
    """Write this rank's part of a checkpoint into ``target`` (atomically, via ``target.partial``). Collective."""
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / DS_DIR).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(partial / DS_DIR), tag=DS_TAG)
    save_hf_model(engine, tokenizer, partial / HF_DIR, zero_stage, rank)
    if rank == 0:
        payload = {**state.to_dict(), **(extra or {})}
        (partial / STATE_FILE).write_text(json.dumps(payload, indent=2))
        with open(partial / COMPLETE, "w") as fh:
            fh.write("ok\n")
            fh.flush()
            os.fsync(fh.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return target


def read_train_state(directory: str | Path, examples_per_micro: int | None = None) -> TrainState:
    """The TrainState of a finished checkpoint; a clear error for an incomplete one. ``examples_per_micro``
    converts states written before the data position counted examples (see ``TrainState.from_dict``)."""
    directory = Path(directory)
    if not (directory / COMPLETE).is_file() or not (directory / STATE_FILE).is_file():
        raise LayerexitError(f"checkpoint {directory} is incomplete (no {COMPLETE} marker)",
                             "delete it or start the run under a new name")
    return TrainState.from_dict(json.loads((directory / STATE_FILE).read_text()), examples_per_micro)


def load_engine_state(engine, directory: str | Path, universal: bool = False) -> None:
    """Restore module, optimizer and LR scheduler state into an initialised DeepSpeed engine; ``universal``: from
    the world-size-free copy ``training.resume`` made (the engine's config has ``checkpoint.load_universal``)."""
    path, _ = engine.load_checkpoint(str(Path(directory) / DS_DIR), tag=UNIVERSAL_TAG if universal else DS_TAG)
    if path is None:
        raise LayerexitError(f"DeepSpeed could not load the checkpoint in {directory}",
                             "delete it or start the run under a new name")


def hf_model_dir(checkpoint_dir: str | Path) -> Path:
    """The plain Hugging Face directory inside a checkpoint."""
    return Path(checkpoint_dir) / HF_DIR
