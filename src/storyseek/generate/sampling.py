"""Next-token choice: logits -> processed distribution -> token, and the speculative acceptance rule.

Every function works on a batch of rows, logits [B, V] with V the tokenizer's real vocabulary
(the caller slices off the padded ids >= tokenizer.vocab_size before anything else, so they can
never be drawn). Processing order follows transformers' / llama2.c's: repetition penalty, then
temperature, then top-k, then top-p.
"""

from __future__ import annotations

import torch

from .config import SamplingConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V], seen [B, V] bool (tokens already in the row): positive logits / penalty,
    negative ones * penalty, so a seen token always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def probabilities(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution a row samples from: logits [B, V] -> probs [B, V] (fp32, rows sum to 1).

    Greedy configs give a one-hot on the argmax, so the speculative rule below degenerates to
    "accept iff the draft is the argmax" without a special case.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.size(-1):
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= cfg.top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs [B, V] -> token ids [B]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023).

    p, q [B, V]: target and draft distributions; draft [B] ~ q. Accept the draft with probability
    min(1, p(x) / q(x)); otherwise draw from norm(max(0, p - q)). The resulting token is distributed
    exactly as p. Returns (accepted [B] bool, token [B]: the draft where accepted, else the resample).
    """
    rows = torch.arange(draft.numel(), device=draft.device)
    px, qx = p[rows, draft], q[rows, draft]
    u = torch.rand(px.shape, generator=generator, device=p.device)
    accepted = u * qx < px  # u < p/q without dividing by a zero q (x ~ q, so q(x) > 0 anyway)
    residual = (p - q).clamp_(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # mass == 0 only when p == q, where rejection cannot happen; fall back to p to keep multinomial valid.
    residual = torch.where(mass > 0, residual, p)
    resampled = draw(residual, generator)
    return accepted, torch.where(accepted, draft, resampled)
