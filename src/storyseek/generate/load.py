"""Model + tokenizer from one path: the only place generation loads weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..data.tokenizer import Tokenizer
from ..errors import StoryseekError
from ..model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StoryseekError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise StoryseekError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs that support it, float32 elsewhere (CPUs without native bf16
    matmuls run bf16 weights slower than fp32, see benchmarks/bench_generate.py)."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise StoryseekError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def to_inference(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Eval mode in `dtype`, keeping in fp32 what must stay precise: the router (its weight and
    balancing bias, as DeepSeek-V3 does: bf16 rounding can flip the top-k near a tie) and the RoPE
    tables (bf16 angles drift at long positions). Both are set aside before the cast and put back
    as they were, bit for bit: casting to bf16 and back would round them."""
    rope = model.rope_cos, model.rope_sin
    routers = [(moe.gate, {k: v.detach().clone() for k, v in moe.gate.state_dict().items()})
               for moe in model.moe_layers()]
    model = model.to(dtype).eval()
    model.rope_cos, model.rope_sin = (t.to(model.rope_cos.device) for t in rope)
    for gate, exact in routers:
        gate.float().load_state_dict(exact)
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
    return to_inference(model, resolve_dtype(dtype, dev)), tokenizer
