"""ModelConfig: every dimension of the DeepSeek-V3-style model, and the named presets.

Names follow DeepSeek-V3's `inference/model.py` (ModelArgs) where one exists, and nanoGPT's
(`n_layer`, `n_head`, `n_embd`, `block_size`) for the dimensions nanoGPT users already know.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import StoryseekError


@dataclass
class ModelConfig:
    # vocabulary and context
    vocab_size: int = 50304  # GPT-2's 50,257 + room for special tokens, padded to a multiple of 64
    block_size: int = 1024  # context length (max_position_embeddings)
    # trunk
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    # attention: "mla" = Multi-head Latent Attention (DeepSeek-V2 section 2.1, mla.py); "mha" = standard
    # multi-head attention with the same head widths and RoPE, caching every head's key and value (mha.py)
    attention: str = "mla"
    # Multi-head Latent Attention (DeepSeek-V2 section 2.1); the query/key/value head widths apply to MHA too
    q_lora_rank: int = 0  # 0: plain query projection, else low-rank query with its own RMSNorm
    kv_lora_rank: int = 128  # d_c: the compressed KV latent, the only per-token state the cache keeps
    qk_nope_head_dim: int = 32  # d_n: per-head query/key part without position
    qk_rope_head_dim: int = 32  # d_r: decoupled RoPE part (per-head query, one shared key)
    v_head_dim: int = 64  # d_v
    rope_theta: float = 10000.0
    # feed-forward: "moe" = the first n_dense_layers are dense SwiGLU, the rest (and MTP) DeepSeekMoE;
    # "dense" = a dense SwiGLU of inter_dim in every block, MTP included (sets n_dense_layers = n_layer)
    ffn: str = "moe"
    n_dense_layers: int = 1  # transformers: first_k_dense_replace
    inter_dim: int = 1536  # hidden width of a dense SwiGLU
    moe_inter_dim: int = 256  # hidden width of one routed expert
    n_routed_experts: int = 4
    n_shared_experts: int = 1  # the shared expert's hidden width is n_shared_experts * moe_inter_dim
    n_activated_experts: int = 2  # top-k
    score_func: str = "sigmoid"  # "sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2)
    route_scale: float = 1.0  # routed_scaling_factor
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free bias rule (0 disables)
    aux_loss_alpha: float = 1e-4  # weight of the balance loss (V3: 1e-4, "just to avoid extreme imbalance")
    aux_loss_type: str = "sequence"  # "sequence" (V3 eq. 17-20) or "batch" (V2, and V3's ablation)
    # Multi-Token Prediction (DeepSeek-V3 section 2.2)
    mtp_depth: int = 1  # D: extra tokens predicted; 1 means the model predicts the next 2 tokens
    mtp_lambda: float = 0.3  # L = L_main + lambda / D * sum_k L_k
    # the rest
    norm_eps: float = 1e-6
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()
        if self.ffn == "dense":
            self.n_dense_layers = self.n_layer

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise StoryseekError(f"invalid model config: {msg}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim", "inter_dim", "moe_inter_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
        need(self.attention in ("mla", "mha"), f"attention must be mla or mha, got {self.attention!r}")
        need(self.ffn in ("moe", "dense"), f"ffn must be moe or dense, got {self.ffn!r}")
        need(self.q_lora_rank >= 0, "q_lora_rank must be >= 0 (0 disables the low-rank query)")
        need(0 <= self.n_dense_layers <= self.n_layer, "n_dense_layers must be between 0 and n_layer")
        need(self.n_routed_experts >= 1, "n_routed_experts must be >= 1")
        need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
        need(1 <= self.n_activated_experts <= self.n_routed_experts,
             f"n_activated_experts (top-k) must be between 1 and n_routed_experts={self.n_routed_experts}")
        need(self.score_func in ("sigmoid", "softmax"), f"score_func must be sigmoid or softmax, got {self.score_func!r}")
        need(self.aux_loss_type in ("sequence", "batch"), f"aux_loss_type must be sequence or batch, got {self.aux_loss_type!r}")
        need(self.mtp_depth >= 0, "mtp_depth must be >= 0")
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layer - self.n_dense_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise StoryseekError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**d)


# Fields that change how a model trains, not what its weights compute: `--init-from` may fine-tune
# with other values, and DeepseekV3's config.json has no key for them (export keeps them aside).
TRAINING_FIELDS = ("dropout", "bias_update_speed", "aux_loss_alpha", "aux_loss_type", "mtp_lambda")


def pad_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n_tokens ids, rounded up so matmuls tile evenly."""
    return -(-n_tokens // multiple) * multiple


# One line per field for `storyseek train --help` and the README's flag table.
FIELD_HELP: dict[str, str] = {
    "attention": "mla (Multi-head Latent Attention) or mha (standard multi-head attention with RoPE, the GPT baseline)",
    "ffn": "moe (DeepSeekMoE after the dense layers) or dense (a dense SwiGLU in every block, MTP included)",
    "n_layer": "transformer blocks",
    "n_head": "attention heads",
    "n_embd": "model (residual stream) width",
    "q_lora_rank": "MLA query compression rank; 0 = plain query projection",
    "kv_lora_rank": "MLA compressed KV latent width d_c (what the cache stores)",
    "qk_nope_head_dim": "per-head query/key width without position",
    "qk_rope_head_dim": "decoupled RoPE width (per-head query part, one shared key)",
    "v_head_dim": "per-head value width",
    "rope_theta": "RoPE base",
    "n_dense_layers": "first N blocks use a dense SwiGLU instead of MoE (first_k_dense_replace)",
    "inter_dim": "hidden width of the dense SwiGLU",
    "moe_inter_dim": "hidden width of one expert (the shared expert: n_shared_experts x this)",
    "n_routed_experts": "routed experts per MoE layer",
    "n_shared_experts": "shared experts per MoE layer (always active)",
    "n_activated_experts": "routed experts per token (top-k)",
    "score_func": "router scores: sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2)",
    "route_scale": "routed scaling factor applied to the gate weights",
    "bias_update_speed": "gamma of the auxiliary-loss-free bias update; 0 disables it",
    "aux_loss_alpha": "weight of the expert balance loss; 0 disables it",
    "aux_loss_type": "balance loss per sequence (V3) or per batch (V2)",
    "mtp_depth": "MTP modules (--multi-token minus 1)",
    "mtp_lambda": "weight of the MTP loss",
    "norm_eps": "RMSNorm epsilon",
    "dropout": "dropout on embeddings, attention and residual branches",
    "tie_embeddings": "share the embedding and output head weights",
    "init_std": "standard deviation of the initial weights",
}


PRESETS: dict[str, ModelConfig] = {
    # The headline model: 6 x 512, 8 heads, 1024 context, GPT-2 vocabulary, 1 dense + 5 MoE layers
    # (4 routed experts, top-2, plus 1 shared), MTP depth 1. ~16.4M non-embedding parameters.
    "default": ModelConfig(),
    # CPU-sized: tests and the offline demo (pair it with a small trained BPE vocabulary).
    # Sized by what a 2-core CPU learns in the demo's 4 minutes: at this width twice the steps of a
    # 192-wide model fit in the budget, and they matter more than width (val loss 0.47 vs 0.63).
    "tiny": ModelConfig(
        vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128,
        kv_lora_rank=48, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_dense_layers=1, inter_dim=384, moe_inter_dim=128,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise StoryseekError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
