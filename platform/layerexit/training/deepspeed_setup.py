"""DeepSpeed for a training config: the config dict (batch sizes consistent by construction, ZeRO stage, offload,
precision, the user's extra keys merged in) and the optimizer it steps."""

from __future__ import annotations

from typing import Any

from layerexit.training.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` (batch sizes consistent by construction)."""
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train_batch_size,
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}

    def merge(dst: dict, src: dict) -> dict:
        for k, v in src.items():
            dst[k] = merge(dict(dst.get(k) or {}), v) if isinstance(v, dict) else v
        return dst

    return merge(ds, cfg.deepspeed.extra)


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]):
    """AdamW for ``cfg``: torch's, or DeepSpeed's CPU Adam when the optimizer state is offloaded to the CPU.

    With ``deepspeed.offload_optimizer`` the optimizer steps on the CPU copy of the fp32 weights; DeepSpeed refuses a
    torch optimizer there (it would be several times slower), so DeepSpeedCPUAdam (AdamW mode, the same
    hyper-parameters and groups) is used. Its C++ op is compiled on first use (ninja and a C++ compiler in the
    image, see the Dockerfile) and cached.
    """
    import torch

    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
