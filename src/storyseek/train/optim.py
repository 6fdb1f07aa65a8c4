"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning rate."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def configure_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                        betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
    """Decay >= 2-D parameters (linears, embedding, router); never norms' gains. The router's
    balancing bias is a buffer, not a parameter, so the optimizer never sees it.

    Fused AdamW (one kernel per tensor, no temporaries) on GPUs and CPUs: on a 2-core CPU it steps
    the tiny preset's 1.7M parameters 3.5x faster than the foreach form, which MPS keeps."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied head/embed appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def allocate_gradients(model: nn.Module) -> None:
    """Give every trainable parameter its gradient now, for each backward to add into and
    zero_grad(set_to_none=False) to clear in place. Needed under CUDA graphs: a gradient the backward
    graph returns lives in the graph's memory pool, which the next replay overwrites, so it must never
    become .grad itself (with --grad-accum only the last micro-batch's would survive:
    pytorch/pytorch#169545)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)


def lr_at(it: float, learning_rate: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Linear warmup to learning_rate over warmup_iters, cosine decay to min_lr at decay_iters, then flat."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)
