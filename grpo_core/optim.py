"""Optimizer and learning-rate schedule, shared by the GRPO and SFT trainers.

    AdamW over the trainable parameters; LR = base · factor(k), k = optimizer steps taken:
      k < warmup:  factor = (k + 1) / warmup                            linear warm-up
      after:       constant 1 | cosine ½(1 + cos(π·f)) | linear 1 − f,  f = (k − warmup) / (total − warmup)

``total`` is fixed when the schedule is built (run.steps · μ for GRPO): raising run.steps on a
resume rebuilds it with the new total, so a decaying schedule stretches from that step on (the
steps already taken keep the LRs they had).
"""

from __future__ import annotations

import math

import torch

from .precision import check_master_weights

SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(model: torch.nn.Module, lr, weight_decay, betas=(0.9, 0.99)):
    """AdamW over the trainable parameters, which must be fp32/fp64 master weights: a 16-bit weight
    loses updates of ~lr to rounding (grpo_core.precision), so it is refused here, whoever calls."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: the model has no trainable parameters (all frozen?)")
    check_master_weights(model, "make_optimizer")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))


def lr_factor(k: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """The multiplier of the base LR at optimizer step k (see module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")
    if k < warmup_steps:
        return (k + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    frac = min((k - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else max(0.0, 1 - frac)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, schedule: str = "constant"):
    """Linear warm-up to the base LR, then constant / cosine / linear decay to 0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, warmup_steps, total_steps, schedule))
