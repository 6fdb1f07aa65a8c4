"""Standard multi-head attention with RoPE: the plain-GPT baseline beside MLA (`--attention mha`).

Per token, with H = n_head, d_n = qk_nope_head_dim, d_r = qk_rope_head_dim, d_v = v_head_dim (MLA's
head widths, so the two attentions score with the same dimensions and differ only in where K and V
come from):

    q_i = W^Q_i x,  k_i = W^K_i x,  v_i = W^V_i x      d_n + d_r, d_n + d_r, d_v per head
    q_i, k_i = [q_n ; RoPE(q_r)], [k_n ; RoPE(k_r)]     the last d_r dimensions of each head rotate
    score_i = q_i . k_i / sqrt(d_n + d_r),   out = wo [softmax(score_i) v_i]_i

Rotating part of each head is "partial rotary" (GPT-J's rotary_dim, GPT-NeoX's rotary_pct); with
d_n = 0 every dimension rotates, as in Llama. Unlike MLA, every head has its own rotary key, and the
cache keeps each head's full key and value: H (d_n + d_r + d_v) numbers per token and layer against
MLA's d_c + d_r (`storyseek info` prints both).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear
from .mla import CacheStep, apply_rope


class KVCache:
    """Per-layer keys and values of every head, preallocated for `max_len` positions.

    k: [n_layers, batch, max_len, n_head, d_n + d_r] (the rotary part already rotated)
    v: [n_layers, batch, max_len, n_head, d_v]
    The interface of `LatentCache`: writes go to explicit positions (a rejected speculative draft
    is simply overwritten), `layer(i)` is what layer i's attention reads and writes.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_head: int, qk_head_dim: int, v_head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.k = torch.zeros(n_layers, batch, max_len, n_head, qk_head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n_layers, batch, max_len, n_head, v_head_dim, dtype=dtype, device=device)

    def layer(self, i: int, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values of the first `rows` sequences (default: all)."""
        return self.k[i, :rows], self.v[i, :rows]

    def narrow(self, row: int, n: int = 1) -> "KVCache":
        """A view of rows [row, row + n): writes through it land in this cache."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, row : row + n], self.v[:, row : row + n]
        return view

    def nbytes_per_token(self) -> int:
        """Bytes one sequence position occupies across all layers."""
        n_layers = self.k.shape[0]
        per_layer = (self.k[0, 0, 0].numel() + self.v[0, 0, 0].numel()) * self.k.element_size()
        return n_layers * per_layer


class MHA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.d_n, self.d_r, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_head_dim = self.d_n + self.d_r
        self.wq = Linear(cfg.n_embd, cfg.n_head * qk_head_dim, bias=False)
        self.wk = Linear(cfg.n_embd, cfg.n_head * qk_head_dim, bias=False)
        self.wv = Linear(cfg.n_embd, cfg.n_head * self.d_v, bias=False)
        self.wo = Linear(cfg.n_head * self.d_v, cfg.n_embd, bias=False)
        self.softmax_scale = qk_head_dim**-0.5
        self.dropout = cfg.dropout

    def _rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """t: [B, S, H * (d_n + d_r)] -> [B, S, H, d_n + d_r] with the last d_r of each head rotated."""
        t_n, t_r = t.unflatten(-1, (self.n_head, self.d_n + self.d_r)).split([self.d_n, self.d_r], dim=-1)
        return torch.cat([t_n, apply_rope(t_r, cos.unsqueeze(2), sin.unsqueeze(2))], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                step: CacheStep | None = None) -> torch.Tensor:
        """x: [B, S, D]; cos/sin: [B or 1, S, d_r] for the positions of x.

        Without a cache: causal self-attention over x. With `cache` = (k [B, T, H, d_n + d_r],
        v [B, T, H, d_v]) of this layer and `step` (where the tokens sit, see MLA.forward): the new
        keys and values are written at their positions; a fresh prefill attends causally among its
        own tokens, a decode step to every cached position <= its own.
        """
        S = x.shape[1]
        q, k = self._rotate(self.wq(x), cos, sin), self._rotate(self.wk(x), cos, sin)  # [B, S, H, d_n + d_r]
        v = self.wv(x).unflatten(-1, (self.n_head, self.d_v))  # [B, S, H, d_v]
        mask = None  # None: causal over x itself
        if cache is not None:
            k_cache, v_cache = cache
            if step.pos is None:
                k_cache[:, :S], v_cache[:, :S] = k, v
            else:
                index = step.pos[..., None, None]  # [B, S, 1, 1]
                k_cache.scatter_(1, index.expand_as(k), k.to(k_cache.dtype))
                v_cache.scatter_(1, index.expand_as(v), v.to(v_cache.dtype))
                T = step.bias.shape[-1]
                k, v = k_cache[:, :T].to(q.dtype), v_cache[:, :T].to(q.dtype)
                mask = step.bias.transpose(1, 2).to(q.dtype)  # [B, 1, S, T]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0,
        )  # [B, H, S, d_v]
        return self.wo(y.transpose(1, 2).flatten(2))
