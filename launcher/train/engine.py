"""The DeepSpeed engine for a run: optimizer, schedule, ZeRO, precision and clipping from the config."""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.train.schedule import WarmupCosine
from ithaca.parallel.megatron_bridge import DeepSpeedMpu
from ithaca.parallel.mesh import ParallelMesh
from ithaca.parallel.zero3 import check_zero3_sequence_parallel, prepare_zero3_sequence_parallel


def deepspeed_config(cfg: RunConfig) -> dict:
    # The pipeline engine's data axis is dp x sp (parallel/pipeline.py), so its batch counts sp copies.
    batch_copies = cfg.parallel.sp if cfg.parallel.pp > 1 else 1
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.train.global_batch * batch_copies,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": 1 << 30,  # our own step line replaces DeepSpeed's
        # Stages hand on two tensors with gradients (the block output and the residual stream);
        # DeepSpeed's split of activations over tp ranks handles only one, so send them whole.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
    }


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); leave norms' gains alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_engine(cfg: RunConfig, model: nn.Module, mesh: ParallelMesh) -> deepspeed.DeepSpeedEngine:
    o = cfg.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps)
    schedule = WarmupCosine(o.warmup_steps, o.decay_steps or cfg.train.steps, o.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    config = deepspeed_config(cfg)
    zero3_sp = cfg.train.zero_stage == 3 and mesh.sp > 1  # left alone, ZeRO-3 drops the sp sum (parallel/zero3.py)
    if zero3_sp:
        config["zero_optimization"].update(prepare_zero3_sequence_parallel(model, mesh))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           mpu=None if mesh.pp > 1 else DeepSpeedMpu(mesh),  # stages bring their grid
                                           config=config)
    if zero3_sp:
        check_zero3_sequence_parallel(model, engine.optimizer, mesh)
    return engine
