"""Honest parameter counts and cache sizes for a ModelConfig (`storyseek info`)."""

from __future__ import annotations

import json

import torch

from .config import ModelConfig, get_preset
from .transformer import Transformer


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameter counts, built on the meta device (no memory, no init cost).

    embedding:      token embedding (+ the output head when it is not tied)
    non_embedding:  the main model without the embedding/head and without MTP
    mtp:            the MTP modules alone (their embedding and head are shared)
    active:         non-embedding parameters one token actually runs through (k of E routed experts)
    total:          everything stored, MTP included
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.head.weight.numel())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    non_embedding = total - embedding - mtp
    expert = sum(p.numel() for p in model.moe_layers()[0].experts[0].parameters()) if model.moe_layers() else 0
    idle_experts = cfg.n_routed_experts - cfg.n_activated_experts
    active = non_embedding - cfg.n_moe_layers * idle_experts * expert
    return {"total": total, "embedding": embedding, "non_embedding": non_embedding, "active": active, "mtp": mtp}


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
