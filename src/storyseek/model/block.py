"""A pre-norm transformer block: x + attention(norm(x)), then x + FFN(norm(x)); attention MLA or MHA, FFN dense or MoE."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .mha import MHA
from .mla import MLA
from .moe import MLP, MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = MHA(cfg) if cfg.attention == "mha" else MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else MLP(cfg.n_embd, cfg.inter_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, S, D] -> (x [B, S, D], this block's balance loss or None)."""
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, pos))
        h = self.ffn(self.ffn_norm(x))
        h, aux = h if isinstance(h, tuple) else (h, None)
        return x + self.dropout(h), aux
