"""`storyseek export --format gguf`: a checkpoint -> one GGUF file that llama.cpp runs as `deepseek2`.

llama.cpp (and Ollama, LM Studio, llama-cpp-python, which embed it) runs DeepSeek-V2/V3 models under
the architecture name `deepseek2`. This writes that layout directly with the `gguf` package: no
Hugging Face detour, no patched converter. Read against llama.cpp's `src/models/deepseek2.cpp`
(loader and graph) and `convert_hf_to_gguf.py` (`DeepseekV2Model`).

Hyperparameters (`deepseek2.*` keys). MLA is stored in its absorbed form, as multi-query attention
over the latent: one KV "head" whose key is [c ; k_r] and whose value is c.

    attention.head_count_kv = 1          key_length = d_c + d_r        value_length = d_c
    attention.key_length_mla = d_n + d_r (the per-head query/key width; scale = 1/sqrt of it)
    attention.value_length_mla = d_v     attention.kv_lora_rank = d_c
    attention.q_lora_rank = q_lora_rank  written even when 0: without it llama.cpp refuses every
                                         layer count but DeepSeek-V2-Lite's; 0 selects `attn_q`
    expert_gating_func = sigmoid | softmax,  expert_weights_norm = (sigmoid),
    expert_weights_scale = route_scale   (llama.cpp's default is softmax: it is always written)

Tensors (torch shapes; GGUF lists the same dimensions reversed). Per block N:

    attn_q [H*(d_n+d_r), D]  or  attn_q_a [q, D], attn_q_a_norm [q], attn_q_b [H*(d_n+d_r), q]
    attn_kv_a_mqa [d_c+d_r, D]   attn_kv_a_norm [d_c]   attn_output [D, H*d_v]
    attn_k_b [H, d_c, d_n]   W^UK_i transposed: llama.cpp multiplies q_n by it (absorption)
    attn_v_b [H, d_v, d_c]   W^UV_i, applied to the attention-weighted latent
    ffn_gate / ffn_up / ffn_down                     dense blocks (N < n_dense_layers)
    ffn_gate_inp [E, D], exp_probs_b.bias [E]        the router and its balancing bias
    ffn_{gate,up}_exps [E, I, D], ffn_down_exps [E, D, I]     routed experts, stacked
    ffn_{gate,up,down}_shexp                         the shared expert(s)

RoPE needs no permutation: ours rotates consecutive pairs, as llama.cpp's "normal" RoPE does.
Left out: the MTP module (llama.cpp decodes without it; its deepseek2 MTP graph needs a low-rank
query, which our presets do not use). A model without shared experts gets one all-zero shared
expert, because llama.cpp's loader requires the tensors (its output is exactly 0).

Tokenizer: `tokenizer.ggml.model = gpt2` (byte-level BPE) with the pre-tokenizer named explicitly
("gpt-2": llama.cpp would not recognize a trained BPE's hash), tokens and merges from the same
tokenizer.json the Hugging Face export writes, our special tokens as control tokens, embedding
rows past the tokenizer as unused `[PAD{id}]` tokens. `<|endoftext|>` ends generation (llama.cpp
treats it so by name); `<|prompt|>` is the end-of-message token, so llama.cpp stops where
`storyseek generate` stops: where the model would begin a new document.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.template import END, PROMPT, STORY
from ..checkpoint import load_checkpoint
from ..data.tokenizer import Tokenizer, hf_tokenizer_json
from ..errors import StoryseekError
from ..files import atomic_write
from ..model import ModelConfig

ARCH = "deepseek2"
GGUF_TYPES = ("f32", "f16", "q8_0")

# A user turn becomes the story prompt; the model answers with a story (chat front ends show it
# clean because `<|story|>` is already in the prompt). Raw completion with `<|prompt|>TEXT` matches
# `storyseek generate`, which lets the model write the header (e.g. a character line) itself.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}" + PROMPT + "{{ message['content'] | trim }}" + STORY +
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] | trim }}" + END +
    "{%- endif -%}"
    "{%- endfor -%}"
)


def export_gguf(model: str | Path, out: str | Path, gguf_type: str = "f32", force: bool = False) -> Path:
    """Write checkpoint (or exported directory) `model` as the GGUF file `out`; returns `out`.

    The file is written under a temporary name beside `out` and renamed into place, so `out` is
    never half-written. An existing `out` is replaced only with `force`.
    """
    gguf = _import_gguf()
    if gguf_type not in GGUF_TYPES:
        raise StoryseekError(f"unknown GGUF type {gguf_type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise StoryseekError(f"output path {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not force:
        raise StoryseekError(f"output file {out} exists; use --force to replace it")
    state = load_checkpoint(model)
    cfg = ModelConfig.from_dict(state["model_config"])
    tokenizer = Tokenizer.from_dict(state["tokenizer"])
    check_gguf_exportable(cfg)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)  # before writing: a tokenizer llama.cpp lacks fails here

    with atomic_write(out) as f:
        # The writer reopens the temporary file by name; atomic_write then fsyncs and renames it.
        writer = gguf.GGUFWriter(f.name, ARCH)
        write_metadata(writer, cfg, tokenizer, vocab, gguf_type, name=f"storyseek-{cfg.n_layer}x{cfg.n_embd}")
        for name, array in gguf_tensors(state["model"], cfg):
            data, qtype = encode_tensor(name, array, gguf_type)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    mtp = " (MTP module left out)" if cfg.mtp_depth else ""
    print(f"exported {model} -> {out} (GGUF {ARCH}, {gguf_type}, {out.stat().st_size / 2**20:.1f} MiB){mtp}")
    return out


def check_gguf_exportable(cfg: ModelConfig) -> None:
    """One clear error for a model llama.cpp's deepseek2 graph would compute differently."""
    if cfg.route_scale == 0:
        # llama.cpp skips a scale of 0 (and 1) as a no-op; ours then zeroes the routed experts.
        raise StoryseekError("route_scale 0 cannot be expressed in GGUF: llama.cpp treats a routed "
                             "scaling factor of 0 as 1 (no scaling)")


# ---------------------------------------------------------------------------------- metadata
def write_metadata(w, cfg: ModelConfig, tokenizer: Tokenizer, vocab: dict, gguf_type: str, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    if gguf_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    d_c, d_n, d_r, d_v = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_leading_dense_block_count(cfg.n_dense_layers)
    w.add_feed_forward_length(cfg.inter_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(1)
    w.add_key_length(d_c + d_r)
    w.add_value_length(d_c)
    w.add_key_length_mla(d_n + d_r)
    w.add_value_length_mla(d_v)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(d_c)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(d_r)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.n_activated_experts)
    w.add_expert_shared_count(max(cfg.n_shared_experts, 1))  # see the all-zero shared expert below
    w.add_expert_feed_forward_length(cfg.moe_inter_dim)
    if cfg.n_routed_experts > 1:  # llama.cpp asserts group count < expert count
        w.add_expert_group_count(1)  # no group-limited routing
        w.add_expert_group_used_count(1)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.score_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_expert_weights_norm(cfg.score_func == "sigmoid")  # V3 renormalizes the top-k sigmoid scores
    w.add_expert_weights_scale(cfg.route_scale)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(tokenizer.eot_id)
    w.add_eos_token_id(tokenizer.eot_id)
    w.add_pad_token_id(tokenizer.eot_id)
    w.add_eom_token_id(tokenizer.special_ids[PROMPT])
    w.add_add_bos_token(False)  # documents start with <|prompt|>, not a BOS token
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def gguf_vocab(tokenizer: Tokenizer, n_rows: int) -> dict:
    """tokens / types / merges for `tokenizer.ggml.*`, one token per embedding row (n_rows)."""
    import gguf

    spec = json.loads(hf_tokenizer_json(tokenizer))
    _check_byte_level(spec, tokenizer)
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    special = set(tokenizer.special_ids.values())
    tokens, types = [], []
    for i in range(n_rows):
        if i < tokenizer.vocab_size:
            if i not in by_id:
                raise StoryseekError(f"tokenizer {tokenizer.spec} has no token for id {i}: cannot list its vocabulary")
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer: never produced by encoding
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def _check_byte_level(spec: dict, tokenizer: Tokenizer) -> None:
    """llama.cpp's "gpt-2" pre-tokenizer is GPT-2's regex followed by the byte-to-unicode map:
    accept exactly the two forms our tokenizers take (the trained BPE, GPT-2 from tiktoken)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1].get("type") == "ByteLevel" and not steps[-1].get("add_prefix_space", False)
    gpt2_regex = (steps[-1].get("use_regex", True) if len(steps) == 1
                  else len(steps) == 2 and steps[0].get("type") == "Split")
    if spec.get("model", {}).get("type") != "BPE" or spec.get("normalizer") or not (byte_level and gpt2_regex):
        raise StoryseekError(f"tokenizer {tokenizer.spec} is not a GPT-2-style byte-level BPE "
                             f"(pre-tokenizer {pre.get('type')!r}): llama.cpp's gpt2 tokenizer cannot reproduce it")


# ----------------------------------------------------------------------------------- tensors
def gguf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig):
    """Yield (GGUF name, float32 array in torch layout) for every tensor llama.cpp loads."""
    H, d_n, d_v, d_c = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def t(key: str) -> np.ndarray:
        return sd[key].detach().to(torch.float32).cpu().numpy()

    yield "token_embd.weight", t("embed.weight")
    for i in range(cfg.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        yield b + "attn_norm.weight", t(p + "attn_norm.weight")
        if cfg.q_lora_rank > 0:
            yield b + "attn_q_a.weight", t(p + "attn.wq_a.weight")
            yield b + "attn_q_a_norm.weight", t(p + "attn.q_norm.weight")
            yield b + "attn_q_b.weight", t(p + "attn.wq_b.weight")
        else:
            yield b + "attn_q.weight", t(p + "attn.wq.weight")
        yield b + "attn_kv_a_mqa.weight", t(p + "attn.wkv_a.weight")
        yield b + "attn_kv_a_norm.weight", t(p + "attn.kv_norm.weight")
        w_uk, w_uv = sd[p + "attn.wkv_b.weight"].view(H, d_n + d_v, d_c).split([d_n, d_v], dim=1)
        yield b + "attn_k_b.weight", w_uk.transpose(1, 2).to(torch.float32).contiguous().numpy()  # [H, d_c, d_n]
        yield b + "attn_v_b.weight", w_uv.to(torch.float32).contiguous().numpy()  # [H, d_v, d_c]
        yield b + "attn_output.weight", t(p + "attn.wo.weight")
        yield b + "ffn_norm.weight", t(p + "ffn_norm.weight")
        if i < cfg.n_dense_layers:
            for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                yield f"{b}ffn_{theirs}.weight", t(f"{p}ffn.{ours}.weight")
            continue
        yield b + "ffn_gate_inp.weight", t(p + "ffn.gate.weight")
        yield b + "exp_probs_b.bias", t(p + "ffn.gate.bias")
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            yield f"{b}ffn_{theirs}_exps.weight", np.stack(
                [t(f"{p}ffn.experts.{e}.{ours}.weight") for e in range(cfg.n_routed_experts)])  # [E, out, in]
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            key = f"{p}ffn.shared_experts.{ours}.weight"
            if key in sd:
                yield f"{b}ffn_{theirs}_shexp.weight", t(key)
            else:  # all-zero shared expert: down_proj 0 makes its output exactly 0
                shape = (cfg.n_embd, cfg.moe_inter_dim) if ours == "w2" else (cfg.moe_inter_dim, cfg.n_embd)
                yield f"{b}ffn_{theirs}_shexp.weight", np.zeros(shape, dtype=np.float32)
    yield "output_norm.weight", t("norm.weight")
    if not cfg.tie_embeddings:  # tied: llama.cpp uses token_embd as the output head
        yield "output.weight", t("head.weight")


def encode_tensor(name: str, array: np.ndarray, gguf_type: str):
    """(data, GGMLQuantizationType) as llama.cpp's converter chooses them: norms, biases (1-D) and the
    router stay f32; other matrices take the requested type; a q8_0 matrix whose rows are not a
    multiple of its 32-value blocks falls back to f16."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import QuantError, quantize

    if gguf_type == "f32" or array.ndim <= 1 or ".ffn_gate_inp." in name:
        return array.astype(np.float32), Q.F32
    if gguf_type == "q8_0":
        try:
            return quantize(array, Q.Q8_0), Q.Q8_0
        except QuantError:
            pass
    return array.astype(np.float16), Q.F16


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise StoryseekError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf
