"""LITE fine-tuning: config, the training loop (no Ray imports), checkpoints, and the Ray Train + DeepSpeed wiring.

Entry points: ``load_train_config(path, overrides)`` and ``run_training(cfg)`` (see ``jobs/train_lite.py``).
"""

from layerexit.training.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config", "run_training"]


def __getattr__(name: str):
    if name == "run_training":  # imports Ray lazily
        from layerexit.training.ray_trainer import run_training

        return run_training
    raise AttributeError(name)
