"""Honest parameter counts and cache sizes for a ModelConfig (`storyseek info`)."""

from __future__ import annotations

import json

from .config import ModelConfig, get_preset


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameter counts, from the config's shapes (tests/test_model.py checks them against
    built models of every variant). Arithmetic, not a model on the meta device: the meta kernels
    of nn.init import torch._dynamo, 1.6 s of every `storyseek generate`.

    embedding:      token embedding (+ the output head when it is not tied)
    non_embedding:  the main model without the embedding/head and without MTP
    mtp:            the MTP modules alone (their embedding and head are shared)
    active:         non-embedding parameters one token actually runs through (k of E routed experts)
    total:          everything stored, MTP included
    """
    D, H, d_qk, d_v = cfg.n_embd, cfg.n_head, cfg.qk_head_dim, cfg.v_head_dim
    if cfg.attention == "mha":
        attn = 2 * D * H * d_qk + 2 * D * H * d_v  # wq, wk; wv, wo
    else:  # MLA: the query (plain, or wq_a + q_norm + wq_b), wkv_a, kv_norm, wkv_b, wo
        q = D * H * d_qk if cfg.q_lora_rank == 0 else cfg.q_lora_rank * (D + 1 + H * d_qk)
        r = cfg.kv_lora_rank
        attn = q + D * (r + cfg.qk_rope_head_dim) + r * (1 + H * (cfg.qk_nope_head_dim + d_v)) + H * d_v * D
    expert = 3 * D * cfg.moe_inter_dim  # SwiGLU: w1, w2, w3
    ffn = {"dense": 3 * D * cfg.inter_dim,
           "moe": cfg.n_routed_experts * (D + expert) + cfg.n_shared_experts * expert}  # gate row + expert each
    block = {kind: attn + 2 * D + n for kind, n in ffn.items()}  # + attn_norm, ffn_norm
    n_moe = cfg.n_moe_layers
    non_embedding = (cfg.n_layer - n_moe) * block["dense"] + n_moe * block["moe"] + D  # + the final norm
    mtp = cfg.mtp_depth * (3 * D + 2 * D * D + block[cfg.ffn])  # enorm, hnorm, norm; eh_proj; its block
    embedding = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    active = non_embedding - n_moe * (cfg.n_routed_experts - cfg.n_activated_experts) * expert
    return {"total": embedding + non_embedding + mtp, "embedding": embedding, "non_embedding": non_embedding,
            "active": active, "mtp": mtp}


def cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 4) -> dict[str, int]:
    """KV cache per token over the trunk's layers: MLA's latent vs. a standard multi-head cache.

    MLA stores c^KV (kv_lora_rank) + the shared rotary key (qk_rope_head_dim) per layer; multi-head
    attention with the same heads would store keys (n_head x qk_head_dim) and values (n_head x v_head_dim).
    """
    latent = cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_element
    mha = cfg.n_layer * cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim) * bytes_per_element
    return {"latent": latent, "mha": mha}


def variant(cfg: ModelConfig) -> str:
    """The architecture in a few words, e.g. "MLA + MoE + MTP" or "MHA + dense" (the plain GPT)."""
    parts = [cfg.attention.upper(), "MoE" if cfg.n_moe_layers else "dense"]
    return " + ".join(parts + ["MTP"] * (cfg.mtp_depth > 0))


def describe(cfg: ModelConfig) -> dict:
    return {"config": cfg.to_dict(), "parameters": count_parameters(cfg),
            "kv_cache_bytes_per_token_fp32": cache_bytes_per_token(cfg)}


def info_command(preset: str, as_json: bool = False) -> None:
    cfg = get_preset(preset)
    d = describe(cfg)
    if as_json:
        print(json.dumps({"preset": preset, **d}, indent=2))
        return
    print(f"preset: {preset}")
    for k, v in d["config"].items():
        print(f"  {k:<22} {v}")
    p = d["parameters"]
    print("parameters:")
    print(f"  {'total (incl. MTP)':<22} {p['total'] / 1e6:8.2f}M")
    print(f"  {'embedding':<22} {p['embedding'] / 1e6:8.2f}M" + ("  (tied with the output head)" if cfg.tie_embeddings else ""))
    print(f"  {'non-embedding':<22} {p['non_embedding'] / 1e6:8.2f}M  (main model, MTP excluded)")
    print(f"  {'active per token':<22} {p['active'] / 1e6:8.2f}M  (non-embedding, {cfg.n_activated_experts} of {cfg.n_routed_experts} routed experts)")
    print(f"  {'MTP modules':<22} {p['mtp'] / 1e6:8.2f}M")
    c = d["kv_cache_bytes_per_token_fp32"]
    print("KV cache per token (fp32, all layers):")
    print(f"  {'MLA latent':<22} {c['latent']:8d} bytes")
    print(f"  {'standard multi-head':<22} {c['mha']:8d} bytes  ({c['mha'] / c['latent']:.1f}x more)")
