"""The Hugging Face `transformers` DeepseekV3 layout, both ways: tensor names and config.json.

Our names follow DeepSeek-V3's official `inference/model.py`; `transformers` uses the names of
DeepSeek's released checkpoints (the mapping in DeepSeek's `inference/convert.py`):

    embed / norm / head                  model.embed_tokens / model.norm / lm_head (absent when tied)
    layers.{i}.attn_norm / ffn_norm      model.layers.{i}.input_layernorm / post_attention_layernorm
    attn.{wq | wq_a, q_norm, wq_b}       self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}
    attn.{wkv_a, kv_norm, wkv_b, wo}     self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}
    ffn.{w1, w2, w3}                     mlp.{gate_proj, down_proj, up_proj}   (dense, each expert, shared)
    ffn.gate.weight / ffn.gate.bias      mlp.gate.weight / mlp.gate.e_score_correction_bias
    mtp.{k}.{enorm, hnorm, eh_proj}      model.layers.{n_layer + k}.{enorm, hnorm, eh_proj}
    mtp.{k}.block.*  /  mtp.{k}.norm     model.layers.{n_layer + k}.* (a decoder layer) / .shared_head.norm

Experts are one key set per expert, as on disk in DeepSeek's checkpoints (`transformers` fuses them
when loading). The MTP layer also carries copies of the embedding and the head
(`embed_tokens`, `shared_head.head`), as DeepSeek-V3 checkpoints store them for tools that load the
MTP layer on its own. RoPE needs no permutation: ours rotates consecutive pairs, exactly
`rope_interleave=True`.

`load_hf_dir(dir)` reads such a directory (ours, or one `save_pretrained` wrote) into the same dict
`load_checkpoint` returns, so generation and `--init-from` accept both; `export/hf.py` writes one
with `to_hf_tensors` and `hf_config`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.tokenizer import HF_TOKENIZER_FILE, TOKENIZER_FILE, BPETokenizer, Tokenizer, load_tokenizer
from ..errors import StoryseekError
from ..model import ModelConfig
from ..model.config import TRAINING_FIELDS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Our settings that DeepseekV3Config has no field for (TRAINING_FIELDS), kept under this config.json key.
STORYSEEK_KEY = "storyseek"

_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}  # SwiGLU: w2(silu(w1 x) * w3 x)

# DeepseekV3Config's defaults for the optional keys we read (a config.json may omit any of them).
_HF_DEFAULTS = {"q_lora_rank": None, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
                "norm_topk_prob": True, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "rope_interleave": True, "attention_bias": False, "n_shared_experts": 1,
                "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "initializer_range": 0.02}


# ------------------------------------------------------------------------------------ names
def _block_names(cfg: ModelConfig, moe: bool) -> list[tuple[str, str]]:
    """(our suffix, HF suffix) for every tensor of one decoder block."""
    attn = ["wq_a", "q_norm", "wq_b"] if cfg.q_lora_rank > 0 else ["wq"]
    names = [("attn_norm.weight", "input_layernorm.weight")]
    names += [(f"attn.{n}.weight", f"self_attn.{_ATTN[n]}.weight") for n in attn + ["wkv_a", "kv_norm", "wkv_b", "wo"]]
    names.append(("ffn_norm.weight", "post_attention_layernorm.weight"))
    if not moe:
        return names + [(f"ffn.{w}.weight", f"mlp.{h}.weight") for w, h in _MLP.items()]
    names += [("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", "mlp.gate.e_score_correction_bias")]
    for e in range(cfg.n_routed_experts):
        names += [(f"ffn.experts.{e}.{w}.weight", f"mlp.experts.{e}.{h}.weight") for w, h in _MLP.items()]
    if cfg.n_shared_experts > 0:
        names += [(f"ffn.shared_experts.{w}.weight", f"mlp.shared_experts.{h}.weight") for w, h in _MLP.items()]
    return names


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state-dict key -> the HF key, for every tensor a model of `cfg` stores (tied head excluded)."""
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("head.weight", "lm_head.weight"))
    for i in range(cfg.n_layer):
        pairs += [(f"layers.{i}.{o}", f"model.layers.{i}.{h}") for o, h in _block_names(cfg, i >= cfg.n_dense_layers)]
    for k in range(cfg.mtp_depth):
        o, h = f"mtp.{k}.", f"model.layers.{cfg.n_layer + k}."
        pairs += [(o + n, h + n) for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight")]
        pairs += [(o + "block." + a, h + b) for a, b in _block_names(cfg, moe=True)]
        pairs.append((o + "norm.weight", h + "shared_head.norm.weight"))
    return dict(pairs)


def to_hf_tensors(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors (contiguous, no shared storage: ready for safetensors)."""
    out = {hf: state_dict[ours].detach().contiguous() for ours, hf in name_map(cfg).items()}
    head = state_dict["embed.weight"] if cfg.tie_embeddings else state_dict["head.weight"]
    for k in range(cfg.mtp_depth):
        layer = f"model.layers.{cfg.n_layer + k}."
        out[layer + "embed_tokens.weight"] = state_dict["embed.weight"].detach().clone()
        out[layer + "shared_head.head.weight"] = head.detach().clone()
    return out


def from_hf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict. Every tensor `cfg` needs must be there; unknown keys are refused."""
    names = name_map(cfg)
    missing = [hf for hf in names.values() if hf not in tensors]
    if missing:
        raise StoryseekError(f"weights lack {missing[0]} (and {len(missing) - 1} more) that the config implies"
                             if len(missing) > 1 else f"weights lack {missing[0]}, which the config implies")
    copies = {f"model.layers.{cfg.n_layer + k}.{n}" for k in range(cfg.mtp_depth)
              for n in ("embed_tokens.weight", "shared_head.head.weight")}
    if cfg.tie_embeddings:
        copies.add("lm_head.weight")  # some writers store the tied head anyway
    unknown = sorted(set(tensors) - set(names.values()) - copies)
    if unknown:
        raise StoryseekError(f"weights hold {unknown[0]}, which storyseek's DeepseekV3 subset does not have")
    state = {ours: tensors[hf] for ours, hf in names.items()}
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state


# ----------------------------------------------------------------------------------- config
def check_exportable(cfg: ModelConfig) -> None:
    """Refuse what DeepseekV3 in transformers would load but compute differently."""
    if cfg.attention != "mla":
        raise StoryseekError(
            f"attention {cfg.attention!r}: the DeepseekV3 format has only Multi-head Latent Attention, so a "
            "multi-head attention baseline cannot be exported; evaluate and generate with it in storyseek directly")
    if cfg.ffn == "dense" and cfg.mtp_depth > 0:
        raise StoryseekError(
            "ffn 'dense' with MTP: transformers' DeepseekV3 always builds the MTP layer as MoE, so a dense MTP "
            "block cannot be exported; train with --multi-token 1 (or --ffn moe) to export")
    if cfg.score_func != "sigmoid":
        raise StoryseekError(
            "score_func 'softmax' (DeepSeek-V2 routing) has no exact transformers DeepseekV3 equivalent "
            "(it always routes with sigmoid scores); train with score_func 'sigmoid' (the default) to export")
    if cfg.mtp_depth > 1:
        raise StoryseekError(
            f"mtp_depth {cfg.mtp_depth}: transformers feeds each MTP depth the normalized output of the previous "
            "one, storyseek (like DeepSeek-V3) the un-normalized one, so only mtp_depth 0 or 1 exports exactly; "
            "train with mtp_depth 1 to export")
    if cfg.n_routed_experts < 2:
        raise StoryseekError("n_routed_experts 1: transformers' DeepseekV3 router needs at least 2 routed experts "
                             "(it scores groups by their top-2); use n_routed_experts >= 2 to export")


def hf_config(cfg: ModelConfig, eot_id: int, dtype: torch.dtype, iters: int | None = None) -> dict:
    """config.json for `DeepseekV3ForCausalLM` computing exactly what `Transformer(cfg)` computes."""
    check_exportable(cfg)
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        # MLA expands K and V per head; the default (128) breaks eager attention for fewer heads.
        "num_key_value_heads": cfg.n_head,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "first_k_dense_replace": cfg.n_dense_layers,
        # one group holding every expert: group-limited routing off, as in storyseek's router
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,  # sigmoid gates are renormalized over the top-k (V3 eq. 13)
        "routed_scaling_factor": cfg.route_scale,
        "scoring_func": "sigmoid",  # legacy DeepSeek keys, read by tools other than transformers
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.block_size,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_interleave": True,  # consecutive-pair rotation, as DeepSeek's complex RoPE
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": None,  # a pad id would freeze that embedding row when fine-tuning in transformers
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        STORYSEEK_KEY: {**{f: getattr(cfg, f) for f in TRAINING_FIELDS}, "iter": iters},
    }


def model_config_from_hf(d: dict, n_mtp_layers: int) -> ModelConfig:
    """A DeepseekV3 config.json -> ModelConfig, refusing what storyseek cannot compute exactly.

    `n_mtp_layers` is how many MTP layers the weights hold (save_pretrained drops them).
    """
    if d.get("model_type") != "deepseek_v3":
        raise StoryseekError(f"model_type {d.get('model_type')!r} is not 'deepseek_v3': "
                             "storyseek reads DeepseekV3 checkpoints only")

    def get(key):
        if key in d:
            return d[key]
        if key in _HF_DEFAULTS:
            return _HF_DEFAULTS[key]
        raise StoryseekError(f"config.json lacks {key!r}")

    def refuse(what: str) -> None:
        raise StoryseekError(f"config.json: {what} is not supported by storyseek")

    if get("hidden_act") != "silu":
        refuse(f"hidden_act {get('hidden_act')!r} (only silu)")
    if get("attention_bias"):
        refuse("attention_bias true")
    if not get("rope_interleave"):
        refuse("rope_interleave false (storyseek rotates consecutive pairs)")
    if d.get("scoring_func", "sigmoid") != "sigmoid":
        refuse(f"scoring_func {d['scoring_func']!r} (only sigmoid)")
    if not get("norm_topk_prob"):
        refuse("norm_topk_prob false (storyseek normalizes the sigmoid top-k weights)")
    if get("n_group") != get("topk_group"):
        refuse(f"group-limited routing (n_group {get('n_group')}, topk_group {get('topk_group')})")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"rope type {rope.get('rope_type', rope.get('type'))!r} (only default RoPE)")
    if n_mtp_layers > 1:
        refuse(f"{n_mtp_layers} MTP layers (at most 1)")
    extra = d.get(STORYSEEK_KEY) or {}
    return ModelConfig(
        vocab_size=get("vocab_size"),
        block_size=get("max_position_embeddings"),
        n_layer=get("num_hidden_layers"),
        n_head=get("num_attention_heads"),
        n_embd=get("hidden_size"),
        q_lora_rank=get("q_lora_rank") or 0,
        kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        n_dense_layers=min(get("first_k_dense_replace"), get("num_hidden_layers")),
        inter_dim=get("intermediate_size"),
        moe_inter_dim=get("moe_intermediate_size"),
        n_routed_experts=get("n_routed_experts"),
        n_shared_experts=get("n_shared_experts") or 0,
        n_activated_experts=get("num_experts_per_tok"),
        score_func="sigmoid",
        route_scale=float(get("routed_scaling_factor")),
        mtp_depth=n_mtp_layers,
        norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(get("tie_word_embeddings")),
        init_std=float(get("initializer_range")),
        **{f: extra[f] for f in TRAINING_FIELDS if f in extra},
    )


# ----------------------------------------------------------------------------------- import
def is_hf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = directory / WEIGHTS_FILE, directory / f"{WEIGHTS_FILE}.index.json"
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():  # sharded: save_pretrained splits large models
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise StoryseekError(f"{directory}: unreadable safetensors weights ({e})") from None
    raise StoryseekError(f"{directory}: no {WEIGHTS_FILE} (storyseek reads safetensors weights only)")


def _read_tokenizer(directory: Path) -> Tokenizer:
    """Ours (tokenizer.storyseek.json) when present, else a byte-level BPE tokenizer.json with our special tokens."""
    if (directory / TOKENIZER_FILE).is_file():
        return load_tokenizer(directory)
    if (directory / HF_TOKENIZER_FILE).is_file():
        try:
            return BPETokenizer((directory / HF_TOKENIZER_FILE).read_text(encoding="utf-8"))
        except StoryseekError:
            raise StoryseekError(f"{directory}/{HF_TOKENIZER_FILE} lacks storyseek's special tokens "
                                 "(<|endoftext|>, <|prompt|>, <|story|>, ...): not a storyseek tokenizer") from None
        except Exception as e:
            raise StoryseekError(f"{directory}/{HF_TOKENIZER_FILE}: unreadable tokenizer ({type(e).__name__})") from None
    raise StoryseekError(f"{directory} has no tokenizer ({TOKENIZER_FILE} or {HF_TOKENIZER_FILE}); "
                         "save the tokenizer into it (tokenizer.save_pretrained(dir))")


def load_hf_dir(directory: str | Path) -> dict:
    """A DeepseekV3 model directory -> the dict `load_checkpoint` returns (model_config, tokenizer, model, iter)."""
    directory = Path(directory)
    try:
        d = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoryseekError(f"{directory}/{CONFIG_FILE}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise StoryseekError(f"{directory}/{CONFIG_FILE} is not a model config")
    tensors = _read_tensors(directory)
    n_layer = d.get("num_hidden_layers", 0)
    n_mtp = 0
    while f"model.layers.{n_layer + n_mtp}.eh_proj.weight" in tensors:
        n_mtp += 1
    try:
        cfg = model_config_from_hf(d, n_mtp)
        state = from_hf_tensors(tensors, cfg)
    except StoryseekError as e:
        raise StoryseekError(f"{directory}: {e}") from None
    tokenizer = _read_tokenizer(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise StoryseekError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{cfg.vocab_size} embedding rows")
    return {"model_config": cfg.to_dict(), "tokenizer": tokenizer.to_dict(), "model": state,
            "iter": (d.get(STORYSEEK_KEY) or {}).get("iter") or 0, "source": str(directory)}
