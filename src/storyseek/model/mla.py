"""Multi-head Latent Attention (DeepSeek-V2 section 2.1) with decoupled RoPE and a latent cache.

Per token, with d_c = kv_lora_rank, d_n = qk_nope_head_dim, d_r = qk_rope_head_dim, d_v = v_head_dim:

    q            = wq x                     or  wq_b(q_norm(wq_a x))     n_head x (d_n + d_r)
    [c ; k_r]    = wkv_a x                                               d_c + d_r
    c            = kv_norm(c)                 the compressed KV latent: all the cache keeps
    k_r          = RoPE(k_r)                  ONE rotary key shared by every head ("decoupled RoPE")
    [k_n ; v]_i  = wkv_b c  viewed per head   W^UK_i (d_n x d_c) and W^UV_i (d_v x d_c)
    score_i      = (q_n,i . k_n,i + RoPE(q_r,i) . k_r) / sqrt(d_n + d_r)

Training, the cache-free forward and a fresh prefill expand K and V and call
`scaled_dot_product_attention` (flash attention; on a CPU in bf16 with few scores, three plain
products instead: MLA._attend_scores). Cached decoding never expands them: q_n,i . (W^UK_i c) = (W^UK_i^T q_n,i) . c,
so the query is moved into latent space and attends to the cached latents directly, and W^UV is
applied after the attention-weighted sum of latents ("absorbed" form, DeepSeek-V2 appendix C).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear
from .norm import RMSNorm


# Most attention scores (batch x heads x S^2) a bf16 forward on a CPU keeps in memory rather than
# calling flash attention (MLA._attend_scores): 8 MB in bf16.
SCORES_IN_MEMORY = 1 << 22


def rope_tables(dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_len, dim] (fp32) for apply_rope: pair j = (x_2j, x_2j+1) turns by the
    angle pos * theta^(-2j/dim), written at both of the pair's elements, and sin carries the sign its
    term has in the rotation (-sin at x_2j, +sin at x_2j+1)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq).repeat_interleave(2, dim=-1)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(dim // 2)
    return angles.cos().float(), (angles.sin() * sign).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as DeepSeek's
    complex-number RoPE does: x * cos + swap(x) * sin with swap(x0, x1) = (x1, x0) and the tables of
    rope_tables (three elementwise ops, the same floats as the complex product).

    x: [..., d_r]; cos/sin broadcast against it. Computed in fp32.
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # [..., d_r]: (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


@dataclass
class CacheStep:
    """Where the tokens of one cached forward sit, built once per forward and shared by every layer.

    pos:  [B, S] absolute position of each new token (rows are independent sequences), or None for
          a fresh prefill: the tokens sit at 0..S-1 of every row and see exactly each other.
    bias: [B, S, 1, T] additive mask over the first T cache positions: 0 where position t <= pos,
          -inf after. T (the attended length) is the caller's choice: anything > pos.max() is exact.
    """

    pos: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def build(cls, pos: torch.Tensor | None, length: int | None = None) -> "CacheStep":
        """Tokens at `pos` attending to the first `length` positions (default pos.max() + 1, which
        reads pos back to the host once; decoders know it and pass it)."""
        if pos is None:
            return cls()
        length = int(pos.max()) + 1 if length is None else length
        visible = torch.arange(length, device=pos.device) <= pos.unsqueeze(-1)  # [B, S, T]
        bias = torch.zeros(visible.shape, device=pos.device).masked_fill_(~visible, float("-inf"))
        return cls(pos, bias.unsqueeze(2))


class LatentCache:
    """Per-layer compressed KV latents and rotary keys, preallocated for `max_len` positions.

    latent: [n_layers, batch, max_len, kv_lora_rank + qk_rope_head_dim]: per position [c ; k_r], the
            kv_norm'ed latent and the rotated key, one tensor so a decode step writes each layer once
            and scores [q_lat ; q_r] . [c ; k_r] in one matmul.
    Writes go to explicit positions, so rolling back (a rejected speculative draft) needs no copy:
    the next write simply overwrites, and attention only reads positions <= the query's own. Rows
    are independent sequences: a server can keep one cache of `batch` slots, prefill a new request
    into a free slot through `narrow(slot)` while the other rows decode at their own positions, and
    a finished row needs no cleanup (its slot is overwritten by the next prefill).
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.latent = torch.zeros(n_layers, batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.latent.shape[1]

    def narrow(self, row: int, n: int = 1) -> "LatentCache":
        """A view of rows [row, row + n): writes through it land in this cache (prefilling one
        slot of a batch: a request joining, or a sequence whose window slides past the context)."""
        view = copy.copy(self)
        view.latent = self.latent[:, row : row + n]
        return view

    def layer(self, i: int, rows: int | None = None) -> torch.Tensor:
        """Layer i's latents [rows, max_len, d_c + d_r] of the first `rows` sequences (default: all):
        what its attention reads and writes."""
        return self.latent[i, :rows]

    def nbytes_per_token(self) -> int:
        """Bytes one sequence position occupies across all layers."""
        n_layers, width = self.latent.shape[0], self.latent.shape[-1]
        return n_layers * width * self.latent.element_size()


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.d_n, self.d_r, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.d_c = cfg.kv_lora_rank
        qk_head_dim = self.d_n + self.d_r
        if cfg.q_lora_rank > 0:
            self.wq_a = Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, cfg.n_head * qk_head_dim, bias=False)
        else:
            self.wq = Linear(cfg.n_embd, cfg.n_head * qk_head_dim, bias=False)
        self.wkv_a = Linear(cfg.n_embd, self.d_c + self.d_r, bias=False)
        self.kv_norm = RMSNorm(self.d_c, cfg.norm_eps)
        self.wkv_b = Linear(self.d_c, cfg.n_head * (self.d_n + self.d_v), bias=False)
        self.wo = Linear(cfg.n_head * self.d_v, cfg.n_embd, bias=False)
        self.softmax_scale = qk_head_dim**-0.5
        self.dropout = cfg.dropout

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        return q.unflatten(-1, (self.n_head, self.d_n + self.d_r))  # [B, S, H, d_n + d_r]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: torch.Tensor | None = None, step: CacheStep | None = None) -> torch.Tensor:
        """x: [B, S, D]; cos/sin: [B or 1, S, d_r] for the positions of x.

        Without a cache: causal self-attention over x. With `cache` = this layer's latents
        [B, max_len, d_c + d_r] and `step` (where the tokens sit): the new latents are written at
        their positions, then a fresh prefill attends causally among its own tokens and a decode
        step attends to every cached position <= its own.
        """
        q_nope, q_pe = self._query(x).split([self.d_n, self.d_r], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(2), sin.unsqueeze(2))  # [B, S, H, d_r]
        c, k_pe = self.wkv_a(x).split([self.d_c, self.d_r], dim=-1)
        c = self.kv_norm(c)  # [B, S, d_c]
        k_pe = apply_rope(k_pe, cos, sin)  # [B, S, d_r]
        if cache is None:
            return self._attend_expanded(q_nope, q_pe, c, k_pe)
        new = torch.cat([c, k_pe], dim=-1).to(cache.dtype)  # [B, S, d_c + d_r]
        if step.pos is None:
            # A fresh prefill sees exactly its own tokens: the expanded causal form (flash attention
            # on GPUs) beats materializing [S, S] latent scores.
            cache[:, : x.shape[1]] = new
            return self._attend_expanded(q_nope, q_pe, c, k_pe)
        cache.scatter_(1, step.pos.unsqueeze(-1).expand_as(new), new)
        return self._attend_latent(q_nope, q_pe, cache[:, : step.bias.shape[-1]], step.bias)

    def _attend_expanded(self, q_nope, q_pe, c, k_pe) -> torch.Tensor:
        B, S, H, _ = q_nope.shape
        k_nope, v = self.wkv_b(c).unflatten(-1, (H, self.d_n + self.d_v)).split([self.d_n, self.d_v], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, S, d_n + d_r]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.d_r)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # [B, H, S, d_v]
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and B * H * S * S <= SCORES_IN_MEMORY:
            y = self._attend_scores(q, k, v)
        else:
            # CPUs' flash kernel wants one width for q, k and v; otherwise SDPA falls back to the math
            # kernel, which materializes [B, H, S, S] scores (4x slower for the tiny preset). Zero
            # columns change no dot product and no weighted sum: pad, then drop the padding.
            if q.device.type == "cpu" and q.size(-1) != self.d_v:
                width = max(q.size(-1), self.d_v)
                q, k, v = (F.pad(t, (0, width - t.size(-1))) for t in (q, k, v))
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0,
            )[..., : self.d_v]  # [B, H, S, d_v]
        return self.wo(y.transpose(1, 2).flatten(2))

    def _attend_scores(self, q, k, v) -> torch.Tensor:
        """Causal softmax(q k^T * scale) v as three products, the [B*H, S, S] scores in memory:
        q, k [B, H, S, d_n + d_r], v [B, H, S, d_v] -> [B, H, S, d_v].

        Used on a CPU in bf16 while the scores are small (SCORES_IN_MEMORY): there oneDNN's bf16
        batched products ran the tiny preset's training step (8 x 4 heads x 256^2 scores) 1.22x
        faster than SDPA's flash kernel in bf16, on a 2-core AMD EPYC (Zen 4), which took 2x as long
        for the attention alone. In fp32 both ran alike, and at the default preset's 1024 context
        flash was faster (and its memory does not grow with S^2)."""
        B, H, S, _ = q.shape
        causal = torch.full((S, S), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        scores = torch.baddbmm(causal.expand(B * H, S, S), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                               alpha=self.softmax_scale)  # [B*H, S, S]
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        return torch.bmm(weights.to(v.dtype), v.flatten(0, 1)).view(B, H, S, self.d_v)

    def _attend_latent(self, q_nope, q_pe, latent, bias) -> torch.Tensor:
        """q_nope [B, S, H, d_n], q_pe [B, S, H, d_r]; latent [B, T, d_c + d_r]; bias [B, S, 1, T]."""
        B, S, H, _ = q_nope.shape
        w_uk, w_uv = self.wkv_b.weight.view(H, self.d_n + self.d_v, self.d_c).split([self.d_n, self.d_v], dim=1)
        q_lat = q_nope.reshape(B * S, H, self.d_n).transpose(0, 1) @ w_uk  # [H, B*S, d_c]
        q = torch.cat([q_lat.transpose(0, 1).reshape(B, S * H, self.d_c), q_pe.reshape(B, S * H, self.d_r)], dim=-1)
        latent = latent.to(q.dtype)
        scores = (q @ latent.transpose(1, 2)).view(B, S, H, -1)  # [B, S, H, T]
        probs = torch.softmax(scores.float() * self.softmax_scale + bias, dim=-1).type_as(q)
        o_lat = probs.view(B, S * H, -1) @ latent[..., : self.d_c]  # [B, S*H, d_c]
        o = o_lat.view(B * S, H, self.d_c).transpose(0, 1) @ w_uv.transpose(1, 2)  # [H, B*S, d_v]
        return self.wo(o.transpose(0, 1).reshape(B, S, H * self.d_v))
