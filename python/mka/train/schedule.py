"""Step budget, learning-rate schedule and optimizer (nanoGPT's recipe)."""

from __future__ import annotations

import math

import torch

from .blocks import TrainSampler
from .options import Settings


def step_budget(settings: Settings, sampler: TrainSampler) -> int:
    if settings.max_steps is not None:
        return settings.max_steps
    if settings.max_tokens is not None:
        return math.ceil(settings.max_tokens / (sampler.global_batch * sampler.T))
    return max(1, math.ceil((settings.epochs or 1.0) * sampler.steps_per_epoch))


def lr_at(step: int, settings: Settings, total_steps: int) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at lr_decay_steps, then flat."""
    lr = settings.lr
    min_lr = lr / 10 if settings.min_lr is None else settings.min_lr
    warmup = settings.warmup_steps
    decay_end = settings.lr_decay_steps or total_steps
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_end:
        return min_lr
    ratio = (step - warmup) / max(1, decay_end - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, settings: Settings, device: torch.device,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW; weight decay on matrices (dim >= 2) only, as in GPT-2 training."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, settings, total_steps) / settings.lr)
    return opt, sched
