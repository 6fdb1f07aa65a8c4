"""Shared by the tests that write checkpoints of random models (export, GGUF, eval)."""

import torch

from storyseek.checkpoint import save_checkpoint
from storyseek.model import Transformer


def random_model(cfg, seed=0):
    """Random weights with non-trivial norms and routing biases, so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.uniform_(-0.1, 0.1)
    return model


def write_ckpt(path, model, tokenizer, **extra):
    """A training checkpoint of `model` (at iteration 7 unless `extra` says otherwise)."""
    save_checkpoint(path, {"model_config": model.cfg.to_dict(), "tokenizer": tokenizer.to_dict(),
                           "model": model.state_dict(), "iter": 7, **extra})
    return path
