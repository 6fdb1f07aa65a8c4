"""DeepSeekMoE: shared experts for every token plus top-k routed experts (DeepSeek-V3 eq. 12-16).

    h' = u + sum_{shared} FFN_s(u) + sum_{i in TopK(s + b)} g_i FFN_i(u)
    s_i = sigmoid(u . e_i)  (V3)  or  softmax_i(u . e)  (V2)
    g_i = s_i / sum_{j in TopK} s_j  (sigmoid only)  x  route_scale

The bias b steers *which* experts are chosen, never how much they weigh. It is not learned by
gradients: after each optimizer step, b_i += gamma * sign(mean load - load_i) (V3 section 2.1.2,
auxiliary-loss-free balancing). An optional balance loss alpha * sum_i f_i P_i (V3 eq. 17-20) can
be added on top, per sequence (V3) or per batch (V2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear, weight_major


# Rows per expert group in the grouped GEMM buffer: 16 bytes of bf16, the alignment grouped GEMM
# kernels want for the token dimension of the weight gradient (torchtitan pads to the same).
ALIGN = 8


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether F.grouped_mm runs here: CUDA wants bf16 on sm_80+; CPU runs it eagerly in any dtype
    (torch.compile's meta kernel accepts only bf16, so compiled CPU code takes the dense path)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and not torch.compiler.is_compiling()


class MLP(nn.Module):
    """SwiGLU feed-forward, w2(silu(w1 x) * w3 x): the dense FFN, each expert and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)  # gate_proj
        self.w2 = Linear(hidden, dim, bias=False)  # down_proj
        self.w3 = Linear(dim, hidden, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """The router. Its weight and the balancing bias stay fp32, as DeepSeek-V3 keeps them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.n_embd))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))  # e_score_correction_bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, D] -> gate weights [N, k], expert indices [N, k], scores [N, E] (fp32)."""
        if torch.is_autocast_enabled(x.device.type):  # rerun with it off (entering the context costs
            with torch.autocast(x.device.type, enabled=False):  # a decode step more than the product)
                return self(x.float())
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        indices = (scores + self.bias).topk(self.topk, dim=-1).indices  # the bias only selects
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)  # norm_topk_prob
        return weights * self.route_scale, indices, scores


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.aux_loss_type = cfg.aux_loss_type
        self.bias_update_speed = cfg.bias_update_speed
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.n_embd, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.n_embd, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts > 0 else None)
        # Tokens routed to each expert since the last bias update (training only; not saved).
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)
        # Inference only (fuse_experts): every expert's weights as two matrices, for moe_decode.
        self.register_buffer("w13", None, persistent=False)  # [2 (E*H + H_s), D]: all w1 rows, then all w3 rows
        self.register_buffer("w2", None, persistent=False)  # [D, E*H + H_s]: all w2 columns

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, D] -> (output [B, T, D], balance loss or None).

        Nothing here reads a tensor's value on the host: no shape depends on the routing, so the
        forward never waits for the device and compiles as one graph."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # [N, D]
        weights, indices, scores = self.gate(flat)  # [N, k], [N, k], [N, E]
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, indices.flatten(), torch.ones_like(indices.flatten()))  # [E] tokens per expert
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if grouped_mm_supported(x.device, dtype):
            out = self._grouped(flat.to(dtype), weights, indices, counts)
        else:
            out = self._dense(flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.training:
            self.load.add_(counts.to(self.load.dtype))
        aux = self._balance_loss(scores, indices, B, T) if self.training and self.aux_loss_alpha > 0 else None
        return out.view(B, T, D), aux

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
        """Every expert in one grouped GEMM per projection (torchtitan's MoE does the same).

        The N*k (token, expert) assignments are copied into a buffer grouped by expert, each group
        padded to a multiple of ALIGN rows (grouped GEMM kernels want aligned groups), of the fixed
        size N*k + E*ALIGN; padding rows are zero and add nothing to outputs or gradients.
        x: [N, D] in the compute dtype -> [N, D]."""
        N, D = x.shape
        k, E = self.topk, self.n_experts
        rows = N * k + E * ALIGN
        padded = (counts + ALIGN - 1) // ALIGN * ALIGN  # [E]
        group_end = padded.cumsum(0)
        group_start = group_end - padded
        flat = indices.flatten()  # [N*k] expert of each assignment, token-major
        order = flat.argsort(stable=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=x.device))  # place in sorted order
        first = counts.cumsum(0) - counts  # [E] sorted position of each expert's first assignment
        dest = group_start[flat] + rank - first[flat]  # [N*k] buffer row of each assignment
        offs = torch.cat([group_end[:-1], group_end.new_full((1,), rows)]).to(torch.int32)  # the last group takes the tail
        buf = x.new_zeros(rows, D).index_copy(0, dest, x.repeat_interleave(k, dim=0))  # [rows, D]
        w1 = torch.stack([e.w1.weight for e in self.experts]).to(x.dtype)  # [E, H, D]
        w3 = torch.stack([e.w3.weight for e in self.experts]).to(x.dtype)
        w2 = torch.stack([e.w2.weight for e in self.experts]).to(x.dtype)  # [E, D, H]
        h = (F.silu(F.grouped_mm(buf, w1.transpose(1, 2), offs=offs))
             * F.grouped_mm(buf, w3.transpose(1, 2), offs=offs))  # [rows, H]
        # back in token order; index_select, not y[dest]: its backward adds rows (index_add) where
        # advanced indexing's accumulating index_put ran 4-5x slower on a CPU
        y = F.grouped_mm(h, w2.transpose(1, 2), offs=offs).index_select(0, dest).view(N, k, D)
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, each output scaled by its gate weight (0 where not chosen):
        E/k times the routed FLOPs, but fixed shapes. The fallback where grouped GEMM is not.
        x: [N, D] -> [N, D]."""
        gates = torch.zeros_like(weights[:, :1]).expand(-1, self.n_experts).scatter(1, indices, weights)  # [N, E]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * gates[:, e : e + 1].to(x.dtype)
        return out

    def _balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """alpha * sum_i f_i P_i, with f_i = E/(k T) * #tokens routed to i and P_i = mean normalized score.

        Sequence-wise (V3 eq. 17-20) averages it over the sequences of the batch; batch-wise (V2)
        treats the whole batch as one sequence.
        """
        groups = B if self.aux_loss_type == "sequence" else 1
        probs = (scores / scores.sum(dim=-1, keepdim=True)).view(groups, -1, self.n_experts)  # [G, L, E]
        chosen = F.one_hot(indices, self.n_experts).sum(dim=1).view(groups, -1, self.n_experts).float()
        f = chosen.mean(dim=1) * (self.n_experts / self.topk)  # [G, E]
        p = probs.mean(dim=1)  # [G, E]
        return self.aux_loss_alpha * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def fuse_experts(self) -> None:
        """For inference: move every expert's weights (routed, then shared) into two matrices,
        w13 [2 (E*H + H_s), D] (their w1 rows, then their w3 rows) and w2 [D, E*H + H_s] (their w2
        side by side), each expert's Linear weights becoming views of them (no second copy). A
        decode step can then run all the experts in two products (moe_decode). Call it after any
        dtype or device change: `.to()` copies views and matrices apart."""
        mlps = list(self.experts) + ([self.shared_experts] if self.shared_experts is not None else [])
        w13 = torch.cat([m.w1.weight for m in mlps] + [m.w3.weight for m in mlps])
        w2 = torch.cat([m.w2.weight for m in mlps], dim=1)
        start, width = 0, w2.shape[1]
        for m in mlps:
            end = start + m.w1.out_features
            m.w1.weight.data, m.w3.weight.data = w13[start:end], w13[width + start : width + end]
            m.w2.weight.data = w2[:, start:end]
            start = end
        self.w13, self.w2 = w13, w2

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: b_i += gamma * sign(mean(load) - load_i), then reset counts.

        `load` is this layer's token count per expert over the whole (global) batch; distributed
        training all-reduces it first so every rank applies the same update.
        """
        self.gate.bias += self.bias_update_speed * torch.sign(load.mean() - load).to(self.gate.bias.dtype)
        self.load.zero_()


DECODE_MAX_TOKENS = 16  # cached forwards of at most this many tokens (decode steps, verifies) use moe_decode


def moe_decode(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The same function as MoE.forward for the few tokens of a decode step (inference, no balance
    loss): x [B, S, D] -> [B, S, D], without sorting tokens by expert.

    Each expert runs on all N tokens, weighted by the gate matrix G [N, E] (zero where not chosen):
    no sorting or gathering, and each expert's weights are read once per step. With the experts
    fused (MoE.fuse_experts) that is two products for all of them (_all_experts). On a CPU, where
    the tokens choose under half of the E x N (expert, token) pairs, only the chosen experts run,
    one by one, in a fixed order so the sums are reproducible: reading the indices on the host costs
    nothing there (no queue to drain), and the others' weights are never read. At half or more the
    two products won (E = 4, top-2, one token: 0.93x the step time for the demo's model, 0.99x for
    the default preset, whose unchosen experts cost reads the saved calls repaid). Elsewhere nothing
    waits for the host, so a GPU keeps its queue full and the step can be graph-captured or compiled.
    """
    B, S, D = x.shape
    flat = x.reshape(-1, D)  # [N, D]
    N = flat.shape[0]
    weights, indices, _ = moe.gate(flat)  # [N, k] each
    gate = torch.zeros(N, moe.n_experts, dtype=flat.dtype, device=flat.device)
    gate.scatter_(1, indices, weights.to(flat.dtype))  # [N, E]
    on_host = flat.device.type == "cpu" and not torch.compiler.is_compiling()
    if moe.w13 is not None and not (on_host and 2 * N * moe.topk < moe.n_experts):
        return _all_experts(moe, flat, gate).view(B, S, D)
    out = moe.shared_experts(flat) if moe.shared_experts is not None else torch.zeros_like(flat)
    for e in sorted(set(indices.flatten().tolist())) if on_host else range(moe.n_experts):
        out = torch.addcmul(out, moe.experts[e](flat), gate[:, e : e + 1])  # + G_e FFN_e(u)
    return out.view(B, S, D)


def _all_experts(moe: MoE, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Every expert, routed and shared, on x [N, D] in two products -> [N, D]. Scaling a routed
    expert's hidden units by its gate weight scales its output (w2 is linear), so the second
    product sums the experts' outputs: sum_i g_i w2_i h_i = [w2_1 ... w2_E w2_s] [g_1 h_1; ...; h_s].

    On a CPU both products are weight-major (W x^T, model/linear.py), a single token duplicated
    into two columns for the first, and each token's hidden units stay contiguous between them.
    Against W x^T without the duplicate and hidden units as rows, that took the default preset's
    one-token step from 15.8 to 14.3 ms and the demo's model's from 2.38 to 2.22 ms (2-core Zen 4
    EPYC, fp32, fine-grained interleaved A/B: the larger w13 had run as a matrix-vector product at
    10 GB/s); at batch 8 both ran alike. GPUs keep one-row products as the matrix-vector kernels
    they are (cuBLAS split two rows along K, 3x slower per product, README's GPU notes)."""
    E, H = moe.n_experts, moe.experts[0].w1.out_features
    h = weight_major(x, moe.w13) if x.device.type == "cpu" else F.linear(x, moe.w13)
    h = h.unflatten(-1, (2, -1))  # [N, 2, E*H + H_s]: every expert's w1 and w3 projections
    act = F.silu(h[:, 0]) * h[:, 1]  # [N, E*H + H_s]
    act[:, : E * H].unflatten(-1, (E, H)).mul_(gate.unsqueeze(-1))  # routed units x g_i (0 where not chosen)
    return (moe.w2 @ act.T).T
