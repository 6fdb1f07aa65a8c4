"""Which number format training computes in: `--dtype auto` and the autocast context.

Master weights and AdamW state are always fp32; bf16/fp16 only apply inside autocast (matmuls and
attention), so `--dtype` trades speed for nothing that is stored.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..errors import StoryseekError

_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs whose bf16 matmuls beat fp32 (several-fold; without them bf16 is
    emulated and far slower than fp32). Read from /proc/cpuinfo (Linux); False elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(compute dtype, why) for `--dtype name` on `device`; StoryseekError when the device cannot."""
    kind = device.type
    if name == "auto":
        if kind == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "bf16 autocast (GPU supports bf16)"
            return torch.float16, "fp16 autocast with a gradient scaler (GPU without bf16)"
        if kind == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16, "bf16 autocast (CPU has AVX512-BF16/AMX)"
        why = "CPU without AVX512-BF16/AMX, where bf16 is slower" if kind == "cpu" else f"{kind} device"
        return torch.float32, f"float32 ({why})"
    if name not in _NAMES:
        raise StoryseekError(f"unknown --dtype {name!r}: choose auto, float32, bfloat16 or float16")
    dtype = _NAMES[name]
    if dtype == torch.float16 and kind != "cuda":
        raise StoryseekError(f"--dtype float16 needs a CUDA GPU (device is {kind}); use --dtype auto, float32 or bfloat16")
    if dtype == torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise StoryseekError("--dtype bfloat16: this GPU does not support bf16; use --dtype auto or float16")
    if dtype == torch.bfloat16 and kind == "mps":
        raise StoryseekError("--dtype bfloat16 is not supported for training on mps; use --dtype float32")
    return dtype, name


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward pass's context: autocast to `dtype`, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
