"""The DeepSeek-V3-style language model: embedding, MLA (or MHA) + (dense | MoE) blocks, final norm, head, MTP.

    out = model(idx, targets)                     training: losses only (no [tokens, vocab] logits)
    out = model(idx)                              evaluation: logits (causal, flash attention)
    cache = model.new_cache(batch, max_len)       incremental decoding on the latent (MHA: key/value) cache:
    out = model(idx, cache=cache)                 a fresh prefill: idx [B, S] at positions 0..S-1
    out = model(idx, cache=cache, pos=pos, length=T)  tokens idx [B, S] at absolute positions pos [B, S],
                                                  attending to cache positions < T (T > pos.max())
    h = model.mtp_draft(h, next_tok)              MTP drafts for self-speculative decoding

Serving many requests from one cache (continuous batching): every cache row is an independent
sequence. A request joins by a fresh prefill of its slot, `model(prompt[None], cache=cache.narrow(slot),
last_only=True)`; then one step decodes the first B slots, each at its own position, `model(tok[:, None],
cache=cache, pos=pos[:, None], length=int(pos.max()) + 1)` with tok and pos [B]: a cache with more rows
than idx lends its first B to the step (the same tensor every step, so a compiled step sees one input
whatever B is). The caller knows the positions, so it passes `length` and the step never reads them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .block import Block
from .config import ModelConfig
from .linear import Linear
from .mha import KVCache
from .loss import linear_cross_entropy
from .mla import CacheStep, LatentCache, rope_tables
from .moe import Gate, MoE
from .mtp import MTPModule
from .norm import RMSNorm


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, S, vocab]: next-token logits (with targets: only if asked)
    hidden: torch.Tensor  # [B, S, D]: final-norm hidden states (MTP's input h_0)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, vocab], predicts t+k+1
    loss: torch.Tensor | None = None  # main + lambda * mtp + balance: what training minimizes
    main_loss: torch.Tensor | None = None  # next-token cross-entropy (comparable across MTP settings)
    mtp_loss: torch.Tensor | None = None  # mean over depths of the MTP cross-entropies
    balance_loss: torch.Tensor | None = None  # sum over MoE layers of the auxiliary balance loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        cos, sin = rope_tables(cfg.qk_rope_head_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [block_size, d_r]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: residual output projections scaled by 1/sqrt(2 * n_layer) so the stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        elif isinstance(module, Gate):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: LatentCache | KVCache | None = None, pos: torch.Tensor | None = None, length: int | None = None,
                last_only: bool = False, return_logits: bool = False) -> ModelOutput:
        """idx: [B, S] token ids. targets: [B, S] the ids that follow (-1 = ignore), for the losses.

        With targets the vocabulary losses never materialize [B, S, vocab] logits (model/loss.py);
        `return_logits` computes them too (and the MTP depths' logits).

        With `cache`, decode incrementally on the latent cache: without `pos`, a fresh prefill of
        every row at positions 0..S-1; with `pos` [B, S] (absolute positions, any per row), each
        token attends to the cached positions <= its own among the first `length` (default
        pos.max() + 1; a decoder knows it, and passing it saves reading pos back from the device).
        `last_only` (inference): logits for the last position only, [B, 1, vocab]; a prefill then
        skips S-1 rows of the vocab-sized head (hidden stays [B, S, D] for MTP).
        MTP runs only with targets (training and its losses); inference pays nothing.
        """
        B, S = idx.shape
        cos, sin = self._rope(S, pos)
        step = None if cache is None else CacheStep.build(pos, length)
        emb = self.embed(idx)  # [B, S, D]
        x = self.dropout(emb)
        balance = []
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, self._layer_cache(cache, i, B), step)
            if aux is not None:
                balance.append(aux)
        h = self.norm(x)
        out = ModelOutput(logits=None, hidden=h)
        if targets is None or return_logits:
            out.logits = self.head(h[:, -1:] if last_only else h)
        if targets is None:
            return out

        out.main_loss = linear_cross_entropy(h, self.head.weight, targets)
        total = out.main_loss
        if self.mtp:
            if S <= len(self.mtp):
                raise ValueError(f"MTP depth {len(self.mtp)} needs sequences longer than {S} tokens")
            h_prev, losses = h, []
            for k, module in enumerate(self.mtp, start=1):
                # Position i of depth k sees tokens up to i + k and predicts token i + k + 1;
                # Emb(t_{i+k}) for i < S - k is the trunk's own lookup shifted: one lookup (and
                # one dense embedding gradient) serves every depth.
                n = S - k
                h_k, aux = module(h_prev[:, :n], emb[:, k:], cos[:, :n], sin[:, :n])
                if aux is not None:
                    balance.append(aux)
                h_k_normed = module.norm(h_k)  # [B, S-k, D]
                losses.append(linear_cross_entropy(h_k_normed, self.head.weight, targets[:, k:]))
                if return_logits:
                    out.mtp_logits.append(self.head(h_k_normed))  # [B, S-k, vocab]
                h_prev = h_k
            out.mtp_loss = torch.stack(losses).mean()
            total = total + self.cfg.mtp_lambda * out.mtp_loss
        if balance:
            out.balance_loss = torch.stack(balance).sum()
            total = total + out.balance_loss
        out.loss = total
        return out

    # ------------------------------------------------------------- decoding API
    def new_cache(self, batch: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> LatentCache | KVCache:
        """A preallocated cache for the main layers (MTP drafts need none): MLA's latents, or MHA's keys and values."""
        cfg = self.cfg
        if cfg.attention == "mha":
            return KVCache(cfg.n_layer, batch, max_len or cfg.block_size, cfg.n_head, cfg.qk_head_dim,
                           cfg.v_head_dim, dtype=dtype or self.embed.weight.dtype, device=self.embed.weight.device)
        return LatentCache(cfg.n_layer, batch, max_len or cfg.block_size, cfg.kv_lora_rank,
                           cfg.qk_rope_head_dim, dtype=dtype or self.embed.weight.dtype, device=self.embed.weight.device)

    def mtp_draft(self, h: torch.Tensor, next_idx: torch.Tensor) -> torch.Tensor:
        """MTP depth 1 as the draft model of self-speculative decoding: h [B, D] the main model's
        final-norm hidden at a position, next_idx [B] the token after it -> [B, D], before MTP's norm
        and the shared head, which propose the token after that (generate/draft.py). Without the MTP
        block's attention, so without a cache (MTPModule.draft says why)."""
        return self.mtp[0].draft(h, self.embed(next_idx))

    def _rope(self, S: int, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, S, d_r] for positions 0..S-1, or [B, S, d_r] for explicit positions."""
        if pos is not None:
            return self.rope_cos[pos], self.rope_sin[pos]
        if S > self.cfg.block_size:
            raise ValueError(f"sequence of {S} tokens exceeds block_size {self.cfg.block_size}")
        return self.rope_cos[:S].unsqueeze(0), self.rope_sin[:S].unsqueeze(0)

    @staticmethod
    def _layer_cache(cache: LatentCache | KVCache | None, i: int, rows: int):
        return None if cache is None else cache.layer(i, rows)

    # ------------------------------------------------------ MoE load balancing
    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, trunk first then MTP, in a fixed order (for logging and bias updates)."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def expert_load(self) -> torch.Tensor:
        """[n_moe_layers, n_experts] tokens routed to each expert since the last bias update."""
        return torch.stack([moe.load for moe in self.moe_layers()])

    def update_expert_bias(self, load: torch.Tensor | None = None) -> None:
        """Apply the auxiliary-loss-free bias rule to every MoE layer and reset the counts.

        `load` defaults to this process's counts; distributed training passes the all-reduced ones.
        """
        load = self.expert_load() if load is None else load
        for moe, layer_load in zip(self.moe_layers(), load):
            moe.update_bias(layer_load)

