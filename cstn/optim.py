"""Optimizer and learning-rate schedule from ``cfg.optim`` (SGD with momentum or AdamW).

Per-group learning rates (backbone, new layers, theta-predicting layers) come from the
model's parameter groups; the schedule multiplies every group's base rate by one factor:
linear warmup over ``warmup_steps``, then cosine to zero, step decay, or constant.
"""

from __future__ import annotations

import math

import torch

from cstn.config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    from cstn.params import freeze, param_groups

    freeze(model, cfg.optim.frozen)   # before DeepSpeed wraps the model: frozen weights get no gradient
    groups = param_groups(model, cfg.optim)
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(step: int, cfg: Config, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base rates at optimizer step ``step`` (0-based)."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        span = max(1, total_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if o.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return o.gamma ** sum(1 for e in o.step_epochs if epoch >= e)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps, steps_per_epoch))
