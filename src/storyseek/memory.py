"""Will it fit? Peak-memory estimates for a training step and for generation, checked against what
the machine has free, so an impossible setting is refused in a second with the numbers instead of
being killed by the kernel (or CUDA) minutes later.

A training step holds, at its peak (the backward pass):

    weights + gradients + AdamW's two moments     16 bytes per parameter (all fp32)
    activations saved for backward                ~8 tensors per block of the widths a token passes
                                                  through: residual D, heads H (d_qk + d_v), FFN
    the vocabulary loss (model/loss.py)           one chunk of logits and its log-softmax (8 bytes x
                                                  CHUNK_ELEMENTS), and per output head (1 + MTP) the
                                                  fp32 head and hidden gradients kept for backward
    attention scores (CPU, dropout only)          the math kernel (flash kernels have no dropout on
                                                  CPUs) keeps [B, H, T, T] per block, 12 bytes per entry

The factors were fitted to measured peaks (fp32, CPU, the tiny preset at T = 256..2048: the estimate
is 10-20% above the measurement), so the check errs on the side of letting a run start.
Generation holds the weights, the cache (every layer's c_KV and k_R for batch x block_size positions;
with --attention mha every head's key and value) and, during the prefill, one layer's expanded keys
and values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import ModelConfig
from .model.info import count_parameters
from .model.loss import CHUNK_ELEMENTS


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes per part, for the message

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {_gb(b)}" for name, b in self.parts.items() if b >= 0.05e9)


def train_step_bytes(cfg: ModelConfig, batch_size: int, block_size: int, device: torch.device,
                     activation_bytes: int = 4) -> Estimate:
    """Peak bytes of one training micro-step (forward + backward) plus the optimizer's state."""
    N, T = batch_size * block_size, block_size
    blocks = cfg.n_layer + cfg.mtp_depth
    heads = cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim)
    ffn_dense = cfg.inter_dim
    ffn_moe = (cfg.n_activated_experts + cfg.n_shared_experts) * cfg.moe_inter_dim + cfg.n_routed_experts
    dense = blocks if cfg.ffn == "dense" else cfg.n_dense_layers
    ffn = (dense * ffn_dense + (blocks - dense) * ffn_moe) / blocks
    per_token_block = 8 * (2 * cfg.n_embd + heads + 2 * cfg.kv_lora_rank + ffn) * activation_bytes
    scores = 0.0
    if device.type != "cuda" and cfg.dropout > 0:
        scores = batch_size * cfg.n_head * T * T * blocks * 12
    return Estimate({
        "weights + gradients + AdamW": 16.0 * count_parameters(cfg)["total"],
        "activations": float(N * blocks * per_token_block),
        "vocabulary loss": 8.0 * min(N * cfg.vocab_size, CHUNK_ELEMENTS)
                           + 4.0 * (cfg.vocab_size + N) * cfg.n_embd * (1 + cfg.mtp_depth),
        "attention scores": float(scores),
    })


def generate_bytes(cfg: ModelConfig, batch: int, dtype_bytes: int) -> Estimate:
    """Peak bytes of generating `batch` rows: weights, the latent cache, the widest prefill layer."""
    # per position and layer, MLA caches c_KV and k_R; standard attention every head's key and value
    width = cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim) if cfg.attention == "mha" else cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = cfg.n_layer * batch * cfg.block_size * width  # MTP drafts need none
    expanded = batch * cfg.block_size * (cfg.n_head * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim) + 4 * cfg.n_embd)
    return Estimate({
        "weights": float(count_parameters(cfg)["total"] * dtype_bytes),
        "KV cache": float(cache * dtype_bytes),
        "prefill": float(expanded * 4),
    })


def free_bytes(device: torch.device) -> tuple[float, str]:
    """(bytes free for a new allocation, what was measured) on `device`: the GPU's free memory, or
    the RAM available to this process (MemAvailable, capped by a cgroup limit as in containers)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0]), f"is free on {torch.cuda.get_device_name(device)}"
    available = _meminfo_available()
    limit = _cgroup_room()
    if limit is not None and (available is None or limit < available):
        return limit, "is free under this container's memory limit"
    if available is None:
        return float("inf"), "of RAM is available (unknown here)"
    return available, "of RAM is available"


def check_fits(estimate: Estimate, device: torch.device, what: str, fix: str, processes: int = 1) -> None:
    """Raise a one-line StoryseekError when `estimate` (per process; `processes` share this RAM)
    exceeds the free memory of `device`."""
    from .errors import StoryseekError

    need = estimate.total * (processes if device.type != "cuda" else 1)
    free, where = free_bytes(device)
    if need > free:
        share = f" x {processes} processes" if processes > 1 and device.type != "cuda" else ""
        raise StoryseekError(f"{what} needs about {_gb(need)}{share} ({estimate.describe()}) but only {_gb(free)} "
                             f"{where}: {fix}")


def _gb(b: float) -> str:
    return f"{b / 1e9:,.1f} GB"


def _meminfo_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> float | None:
    """cgroup v2 limit minus usage (containers, CI runners, Slurm jobs), when there is a limit. The
    page cache counts as usage there but is given back on demand, so it counts as room here."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((base / "memory.current").read_text())
        stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        return float(int(limit) - used + int(stat.get("file", 0)))
    except (OSError, ValueError):
        return None


def local_processes() -> int:
    """Training processes sharing this machine's RAM (torchrun's LOCAL_WORLD_SIZE; 1 alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
