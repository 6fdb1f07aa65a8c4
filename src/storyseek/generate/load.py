"""Model + tokenizer from one path: the only place generation loads weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..data.tokenizer import Tokenizer
from ..device import resolve_device, resolve_dtype, weight_major_rows
from ..errors import StoryseekError
from ..model import Transformer
from ..model.linear import Linear, set_weight_major_rows


def to_inference(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Eval mode in `dtype`, keeping in fp32 what must stay precise: the router (its weight and
    balancing bias, as DeepSeek-V3 does: bf16 rounding can flip the top-k near a tie) and the RoPE
    tables (bf16 angles drift at long positions). Both are set aside before the cast and put back
    as they were, bit for bit: casting to bf16 and back would round them. Each MoE layer's experts
    are fused into two matrices (MoE.fuse_experts) for the decode step. On a CPU, the decode
    step's few-row products take the layout measured fastest for these weights (model/linear.py)."""
    rope = model.rope_cos, model.rope_sin
    routers = [(moe.gate, {k: v.detach().clone() for k, v in moe.gate.state_dict().items()})
               for moe in model.moe_layers()]
    model = model.to(dtype).eval()
    model.rope_cos, model.rope_sin = (t.to(model.rope_cos.device) for t in rope)
    for gate, exact in routers:
        gate.float().load_state_dict(exact)
    for moe in model.moe_layers():
        moe.fuse_experts()
    if model.embed.weight.device.type == "cpu":
        weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
        set_weight_major_rows(model, weight_major_rows(weights)[0])
    return model


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> tuple[Transformer, Tokenizer]:
    """A training checkpoint file (best_model.pt, latest.pt, ...) or an exported Hugging Face model
    directory -> (model in eval mode on `device` in `dtype`, its tokenizer)."""
    dev = resolve_device(device)
    state = load_checkpoint(path, map_location="cpu")
    if not state.get("tokenizer"):
        raise StoryseekError(f"{path} has no tokenizer description, so its ids cannot be turned into text")
    tokenizer = Tokenizer.from_dict(state["tokenizer"])
    model = model_from_checkpoint(state, dev)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise StoryseekError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{model.cfg.vocab_size} embeddings")
    # auto on a CPU times a decode step's matmuls (a few rows) in fp32 and bf16, each in its faster layout
    cfg = model.cfg
    shapes = [(8, cfg.n_embd, cfg.vocab_size), (8, cfg.n_embd, cfg.moe_inter_dim)]
    return to_inference(model, resolve_dtype(dtype, dev, shapes, decode=True)[0]), tokenizer
