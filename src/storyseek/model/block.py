"""A pre-norm transformer block: x + attention(norm(x)), then x + FFN(norm(x)); attention MLA or MHA, FFN dense or MoE."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .mha import MHA
from .mla import MLA, CacheStep
from .moe import DECODE_MAX_TOKENS, MLP, MoE, moe_decode
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
                cache=None, step: CacheStep | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, S, D] -> (x [B, S, D], this block's balance loss or None). `cache`: this layer's
        part of the cache (`cache.layer(i)`) and `step` where x's tokens sit in it (see MLA.forward)."""
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, step))
        h, aux = self.feed_forward(x, decoding=cache is not None)
        return x + self.dropout(h), aux

    def feed_forward(self, x: torch.Tensor, decoding: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, S, D] -> (FFN(norm(x)) [B, S, D], its balance loss or None); `decoding`: inference on
        a few tokens, where MoE takes its single-token path (moe_decode)."""
        if decoding and isinstance(self.ffn, MoE) and x.shape[0] * x.shape[1] <= DECODE_MAX_TOKENS:
            return moe_decode(self.ffn, self.ffn_norm(x)), None
        h = self.ffn(self.ffn_norm(x))
        return h if isinstance(h, tuple) else (h, None)
