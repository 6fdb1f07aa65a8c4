"""Multi-head Latent Attention (DeepSeek-V2 section 2.1) with decoupled RoPE and a latent cache.

Per token, with d_c = kv_lora_rank, d_n = qk_nope_head_dim, d_r = qk_rope_head_dim, d_v = v_head_dim:

    q            = wq x                     or  wq_b(q_norm(wq_a x))     n_head x (d_n + d_r)
    [c ; k_r]    = wkv_a x                                               d_c + d_r
    c            = kv_norm(c)                 the compressed KV latent: all the cache keeps
    k_r          = RoPE(k_r)                  ONE rotary key shared by every head ("decoupled RoPE")
    [k_n ; v]_i  = wkv_b c  viewed per head   W^UK_i (d_n x d_c) and W^UV_i (d_v x d_c)
    score_i      = (q_n,i . k_n,i + RoPE(q_r,i) . k_r) / sqrt(d_n + d_r)

Training, the cache-free forward and a fresh prefill expand K and V and call
`scaled_dot_product_attention` (flash attention on GPUs). Cached decoding never expands them: q_n,i . (W^UK_i c) = (W^UK_i^T q_n,i) . c,
so the query is moved into latent space and attends to the cached latents directly, and W^UV is
applied after the attention-weighted sum of latents ("absorbed" form, DeepSeek-V2 appendix C).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm


def rope_tables(dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_len, dim / 2] for the pairwise rotation below (fp32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... as DeepSeek's complex-number RoPE does.

    x: [..., d_r]; cos/sin broadcast against [..., d_r / 2]. Computed in fp32.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., d_r/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class LatentCache:
    """Per-layer compressed KV latents and rotary keys, preallocated for `max_len` positions.

    kv: [n_layers, batch, max_len, kv_lora_rank] (already kv_norm'ed)
    pe: [n_layers, batch, max_len, qk_rope_head_dim] (already rotated)
    Writes go to explicit positions, so rolling back (a rejected speculative draft) needs no copy:
    the next write simply overwrites, and attention only reads positions <= the query's own.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len
        self.kv = torch.zeros(n_layers, batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(n_layers, batch, max_len, rope_dim, dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[i], self.pe[i]

    def narrow(self, row: int, n: int = 1) -> "LatentCache":
        """A view of rows [row, row + n): writes through it land in this cache (re-prefilling one
        sequence of a batch, e.g. when its window slides past the context)."""
        view = copy.copy(self)
        view.kv, view.pe = self.kv[:, row : row + n], self.pe[:, row : row + n]
        return view

    def nbytes_per_token(self) -> int:
        """Bytes one sequence position occupies across all layers."""
        n_layers = self.kv.shape[0]
        per_layer = (self.kv.shape[-1] + self.pe.shape[-1]) * self.kv.element_size()
        return n_layers * per_layer


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.d_n, self.d_r, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.d_c = cfg.kv_lora_rank
        qk_head_dim = self.d_n + self.d_r
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_head * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.n_embd, cfg.n_head * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.n_embd, self.d_c + self.d_r, bias=False)
        self.kv_norm = RMSNorm(self.d_c, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.d_c, cfg.n_head * (self.d_n + self.d_v), bias=False)
        self.wo = nn.Linear(cfg.n_head * self.d_v, cfg.n_embd, bias=False)
        self.softmax_scale = qk_head_dim**-0.5
        self.dropout = cfg.dropout

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        return q.unflatten(-1, (self.n_head, self.d_n + self.d_r))  # [B, S, H, d_n + d_r]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, D]; cos/sin: [B or 1, S, d_r/2] for the positions of x.

        Without a cache: causal self-attention over x. With `cache` = (kv [B, T, d_c], pe [B, T, d_r])
        of this layer and `pos` [B, S] the absolute position of each new token: the new latents are
        written at `pos` and each token attends to every cached position <= its own.
        """
        B, S, _ = x.shape
        q_nope, q_pe = self._query(x).split([self.d_n, self.d_r], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(2), sin.unsqueeze(2))  # [B, S, H, d_r]
        c, k_pe = self.wkv_a(x).split([self.d_c, self.d_r], dim=-1)
        c = self.kv_norm(c)  # [B, S, d_c]
        k_pe = apply_rope(k_pe, cos, sin)  # [B, S, d_r]
        if cache is None:
            return self._attend_expanded(q_nope, q_pe, c, k_pe)
        kv_cache, pe_cache = cache  # [B, T, d_c], [B, T, d_r]
        rows = torch.arange(B, device=pos.device).unsqueeze(1)  # [B, 1]
        kv_cache[rows, pos] = c.to(kv_cache.dtype)
        pe_cache[rows, pos] = k_pe.to(pe_cache.dtype)
        if S > 1 and torch.equal(pos, torch.arange(S, device=pos.device).expand(B, S)):
            # A fresh prefill sees exactly its own tokens: the expanded causal form (flash attention
            # on GPUs) beats materializing [S, S] latent scores.
            return self._attend_expanded(q_nope, q_pe, c, k_pe)
        return self._attend_latent(q_nope, q_pe, kv_cache, pe_cache, pos)

    def _attend_expanded(self, q_nope, q_pe, c, k_pe) -> torch.Tensor:
        B, S, H, _ = q_nope.shape
        k_nope, v = self.wkv_b(c).unflatten(-1, (H, self.d_n + self.d_v)).split([self.d_n, self.d_v], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, S, d_n + d_r]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.d_r)], dim=-1).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v.transpose(1, 2), is_causal=True, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, H, S, d_v]
        return self.wo(y.transpose(1, 2).flatten(2))

    def _attend_latent(self, q_nope, q_pe, kv_cache, pe_cache, pos) -> torch.Tensor:
        T = int(pos.max()) + 1  # only positions up to the furthest query can be attended
        kv, pe = kv_cache[:, :T], pe_cache[:, :T]
        w = self.wkv_b.weight.view(self.n_head, self.d_n + self.d_v, self.d_c)
        w_uk, w_uv = w[:, : self.d_n], w[:, self.d_n :]  # [H, d_n, d_c], [H, d_v, d_c]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk.to(q_nope.dtype))  # [B, S, H, d_c]
        scores = (torch.einsum("bshc,btc->bsht", q_lat, kv.to(q_lat.dtype))
                  + torch.einsum("bshr,btr->bsht", q_pe, pe.to(q_pe.dtype))) * self.softmax_scale
        visible = torch.arange(T, device=pos.device) <= pos.unsqueeze(-1)  # [B, S, T]
        scores = scores.masked_fill(~visible.unsqueeze(2), float("-inf"))
        probs = scores.float().softmax(dim=-1).type_as(q_lat)  # [B, S, H, T]
        o_lat = torch.einsum("bsht,btc->bshc", probs, kv.to(probs.dtype))  # [B, S, H, d_c]
        o = torch.einsum("bshc,hdc->bshd", o_lat, w_uv.to(o_lat.dtype))  # [B, S, H, d_v]
        return self.wo(o.flatten(2))
