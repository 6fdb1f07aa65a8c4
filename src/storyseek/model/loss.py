"""The vocabulary loss without [tokens, vocab] logits: a chunked linear + cross-entropy.

The plain path, logits = h W^T [N, V] -> log_softmax -> NLL, keeps the [N, V] logits for backward,
which then writes [N, V] gradients twice more (a zero fill and the softmax backward): with a 50k
vocabulary that moves more bytes than the head's GEMM multiplies. Here, per chunk of C rows:

    z    = h_c W^T                       [C, V]  (the compute dtype; fp32 for the softmax)
    loss = sum_rows logsumexp(z) - z[target]
    dz   = (softmax(z) - onehot(target)) / n_valid                the gradient of the mean loss
    dh_c = dz W                          [C, D]
    dW  += dz^T h_c                      [V, D]  (fp32)

all inside the forward, as Liger Kernel's fused linear cross-entropy does, so the backward only
scales dh and dW by the incoming gradient: three GEMMs, as in the plain path, and one [C, V]
chunk alive instead of [N, V]. Recomputing z in the backward instead would save dh and dW until
then but costs a fourth GEMM. Targets of -1 are ignored, as F.cross_entropy's ignore_index.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -1
CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MB of fp32, 667 rows of a 50,304 vocabulary
SCORE_ROWS = 4096  # positions per head product when scoring: at most 4096 x vocab logits at once
# Compiled on these devices, a chunk is a nested region: traced once, called per chunk (_compiled_chunk).
# Elsewhere torch.compile unrolls the chunk loop, as it does on torch < 2.8, which has no regions.
REGION_DEVICES = ("cpu",)
_nested_region = getattr(torch.compiler, "nested_compile_region", lambda fn: fn)


def token_nats(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats of every position, for evaluation (no gradients): head(h) against
    targets, SCORE_ROWS positions at a time, so [N, vocab] logits never exist at once (for the default
    preset's batch of 12 x 1024 they would take 2.5 GB in fp32, twice over inside the loss).

    head: the output layer; h: [N, D] hidden states; targets: [N] ids -> [N] fp32."""
    return torch.cat([F.cross_entropy(head(h[i : i + SCORE_ROWS]).float(), targets[i : i + SCORE_ROWS], reduction="none")
                      for i in range(0, len(targets), SCORE_ROWS)])


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits h W^T against targets, never holding all of them.

    h: [..., D] hidden states; weight: [V, D] the output head; targets: [...] ids (-1 = ignore).
    Under autocast the GEMMs run in the autocast dtype, as F.linear would; the softmax in fp32.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    h, targets = h.reshape(-1, h.size(-1)).to(dtype), targets.reshape(-1)
    chunk = max(1, CHUNK_ELEMENTS // weight.size(0))
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h, weight.to(dtype), targets, chunk)


def _log_probs(h_c: torch.Tensor, weight: torch.Tensor, t_c: torch.Tensor, v_c: torch.Tensor):
    """log softmax(h_c W^T) [C, V] in fp32, and the sum of its targets' entries over the valid rows."""
    logp = torch.log_softmax(F.linear(h_c, weight).float(), dim=-1)
    return logp, (logp.gather(1, t_c).squeeze(1) * v_c).sum()


def _softmax_grad(logp: torch.Tensor, t_c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d loss_row / d z = softmax(z) - onehot(target) [C, V] in `dtype`. Eagerly in place of logp (no
    [C, V] pass more). Compiled, one pointwise expression, which inductor fuses into the softmax's
    kernel and writes once in `dtype` (an in-place scatter makes it write fp32 [C, V] first)."""
    if torch.compiler.is_compiling():
        col = torch.arange(logp.size(1), device=logp.device)  # [V]
        return (logp.exp() - (col == t_c).to(logp.dtype)).to(dtype)
    return logp.exp_().scatter_add_(1, t_c, torch.full_like(t_c, -1, dtype=logp.dtype)).to(dtype)


@_nested_region
def _compiled_chunk(h_c, weight, t_c, v_c, s_c, dw):
    """One chunk of the loop below as a nested region: (the chunk's sum of target log-probs, dh_c
    [C, D], dW + dz^T (h_c s_c) [V, D] fp32). It must be pure (no input mutated or aliased), hence
    returns, not the loop's in-place updates.

    Unrolled, the compile time grew faster than the chunks (the default preset's head alone on a
    2-core CPU: 19 s at 4 chunks of 667 rows, 82 s at 32; batch 48 x 1024 has 74 per head); as a
    region, 6 s at 4 and 23 s at 32, with the same step time and memory. Only on a CPU: on an H200
    (torch 2.11, bf16, batch 12 x 1024, CUDA graphs) the region's step ran at 0.69x the unrolled
    loop's tokens/s and took 21.6 GiB instead of 3.9 (README, "On a GPU").
    """
    logp, logl = _log_probs(h_c, weight, t_c, v_c)  # [C, V] fp32, []
    dz = _softmax_grad(logp, t_c, h_c.dtype)  # [C, V]
    hs = h_c * s_c  # [C, D]
    dw = torch.addmm(dw, dz.T, hs) if dz.dtype == torch.float32 else dw + (dz.T @ hs).float()
    return logl, (dz @ weight) * s_c, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = targets != IGNORE  # [N]
        n_valid = valid.sum().clamp(min=1)
        scale = (valid / n_valid).to(h.dtype).unsqueeze(1)  # [N, 1]: d mean / d row, 0 where ignored
        safe = targets.clamp(min=0).unsqueeze(1)  # [N, 1]: any id for ignored rows (scaled by 0)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if want_grad else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        region = want_grad and torch.compiler.is_compiling() and h.device.type in REGION_DEVICES
        for s in range(0, h.size(0), chunk):
            h_c, t_c, v_c, s_c = h[s : s + chunk], safe[s : s + chunk], valid[s : s + chunk], scale[s : s + chunk]
            if region:
                # copies, not views: torch 2.11 reused a region only for inputs at equal storage
                # offsets (each [C, D] copy is small beside the chunk's [C, V])
                h_c, t_c, v_c, s_c = h_c.clone(), t_c.clone(), v_c.clone(), s_c.clone()
                logl, dh[s : s + chunk], dw = _compiled_chunk(h_c, weight, t_c, v_c, s_c, dw)
                loss -= logl
                continue
            logp, logl = _log_probs(h_c, weight, t_c, v_c)
            loss -= logl
            if not want_grad:
                continue
            # the row scale goes on the [C, D] operands, not on the [C, V] chunk
            dz = _softmax_grad(logp, t_c, h.dtype)
            dh[s : s + chunk] = (dz @ weight) * s_c
            if dz.dtype == torch.float32:
                dw.addmm_(dz.T, h_c * s_c)
            else:
                dw += (dz.T @ (h_c * s_c)).float()
        ctx.save_for_backward(dh, dw)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        return dh * grad.to(dh.dtype), (dw * grad).to(dh.dtype), None, None

