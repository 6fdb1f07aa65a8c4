"""The model card (README.md) of an exported model: what it is, what it saw, how to run it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..checkpoint.pt import METRICS_CSV
from ..data.template import story_prompt
from ..data.tokenizer import Tokenizer
from ..model import ModelConfig
from ..model.info import cache_bytes_per_token, count_parameters

EXAMPLE_PROMPT = "Write a story about a brave little mouse who is afraid of the dark."


def model_card(state: dict, cfg: ModelConfig, tokenizer: Tokenizer, run_dir: Path,
               repo_id: str | None = None, has_plot: bool = False) -> str:
    """Markdown with a YAML header. `run_dir` is the training output dir (losses CSV, data path)."""
    train_cfg = state.get("train_config") or {}
    meta = _data_meta(train_cfg.get("data"))
    dataset = (meta.get("source") or {}).get("dataset")
    where = repo_id or "./exported-model"
    p = count_parameters(cfg)
    kv = cache_bytes_per_token(cfg, 4)
    header = ["---", "library_name: transformers", "pipeline_tag: text-generation",
              "tags: [storyseek, deepseek_v3, mla, moe, mtp, children-stories, text-generation]"]
    if dataset:
        header.append(f"datasets: [{dataset}]")
    header.append("---")
    moe = f"{cfg.n_moe_layers} MoE layer{'s' if cfg.n_moe_layers != 1 else ''}"
    dense = f"{cfg.n_dense_layers} dense SwiGLU layer{'s' if cfg.n_dense_layers != 1 else ''}"
    lines = header + [
        "",
        f"# {repo_id.split('/')[-1] if repo_id else 'storyseek story model'}",
        "",
        "A small DeepSeek-V3-architecture language model that writes children's stories, trained with "
        "storyseek and exported to the `transformers` `DeepseekV3ForCausalLM` format: "
        "Multi-head Latent Attention (MLA), DeepSeekMoE with auxiliary-loss-free load balancing, and a "
        "Multi-Token Prediction (MTP) module usable for speculative decoding.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| layers x width x heads | {cfg.n_layer} x {cfg.n_embd} x {cfg.n_head} |",
        f"| context | {cfg.block_size} tokens |",
        f"| vocabulary | {tokenizer.vocab_size} ids (`{tokenizer.spec}`), embedding padded to {cfg.vocab_size} |",
        f"| MLA | kv_lora_rank {cfg.kv_lora_rank}, q_lora_rank {cfg.q_lora_rank or 'none'}, "
        f"qk_nope {cfg.qk_nope_head_dim} + qk_rope {cfg.qk_rope_head_dim}, v {cfg.v_head_dim} per head |",
        f"| feed-forward | {dense} (hidden {cfg.inter_dim}), {moe} |",
        f"| MoE | {cfg.n_routed_experts} routed experts (top-{cfg.n_activated_experts}, sigmoid gates, "
        f"scale {cfg.route_scale}) + {cfg.n_shared_experts} shared, expert hidden {cfg.moe_inter_dim} |",
        f"| MTP | depth {cfg.mtp_depth} (stored as `model.layers.{cfg.n_layer}`) |" if cfg.mtp_depth
        else "| MTP | none |",
        f"| RoPE | theta {cfg.rope_theta:g}, interleaved pairs (`rope_interleave: true`) |",
        f"| embeddings | {'tied with the output head' if cfg.tie_embeddings else 'untied'} |",
        "",
        "## Parameters",
        "",
        "| count | parameters |",
        "|---|---:|",
        f"| total (MTP included) | {_m(p['total'])} |",
        f"| embedding | {_m(p['embedding'])} |",
        f"| non-embedding (main model) | {_m(p['non_embedding'])} |",
        f"| active per token (non-embedding) | {_m(p['active'])} |",
        f"| MTP module | {_m(p['mtp'])} |",
        "",
        f"KV cache: {kv['latent']:,} bytes per token in fp32 (MLA latent) instead of {kv['mha']:,} for "
        f"standard multi-head attention with the same heads ({kv['mha'] / kv['latent']:.1f}x less).",
        "",
        "## Training",
        "",
        *_training_lines(state, cfg, train_cfg, meta, run_dir),
    ]
    if has_plot:
        lines += ["", "![training metrics](training_metrics.png)"]
    prompt = story_prompt(EXAMPLE_PROMPT)
    lines += [
        "",
        "## Use with transformers",
        "",
        "Stories are prompted with the training template, `<|prompt|>` instruction `<|story|>`; generation "
        "stops at `<|endoftext|>` or at a template marker, as in storyseek (the eos ids in `generation_config.json`).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{where}")',
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'ids = tok("{prompt}", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=300, do_sample=True, temperature=0.8)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
    ]
    if cfg.mtp_depth:
        lines += [
            "Speculative decoding with the MTP module (`transformers` >= 5, batch size 1). `transformers` only "
            f"looks for MTP weights under `model.layers.61`; this model keeps them under `model.layers.{cfg.n_layer}`, "
            "so point it there first (loading prints these keys as UNEXPECTED: that is expected):",
            "",
            "```python",
            f'model._keys_to_ignore_on_load_unexpected = [r"model\\.layers\\.{cfg.n_layer}\\..*"]',
            "out = model.generate(ids, max_new_tokens=300, use_mtp=True)  # same tokens as without MTP when greedy",
            "```",
            "",
        ]
    lines += [
        "## Use with storyseek",
        "",
        "```bash",
        *([f"hf download {repo_id} --local-dir story-model"] if repo_id else []),
        f'storyseek generate --model {"story-model" if repo_id else where} --prompt "{EXAMPLE_PROMPT}"',
        "```",
        "",
        "storyseek decodes on MLA's compressed latent cache and can draft with the MTP module; "
        f"`storyseek train --init-from {'story-model' if repo_id else where}` continues training from these weights.",
        "",
        "## Limitations",
        "",
        "A small model trained on a small corpus: stories are simple, can lose track of characters and are not "
        "fact-checked. Not for anything beyond play and experiments.",
        "",
    ]
    return "\n".join(lines)


def _training_lines(state: dict, cfg: ModelConfig, train_cfg: dict, meta: dict, run_dir: Path) -> list[str]:
    steps = state.get("iter", 0)
    out = [f"- optimizer steps: {steps:,}"]
    if train_cfg:
        per_step = (train_cfg.get("batch_size", 0) * (train_cfg.get("block_size") or cfg.block_size)
                    * train_cfg.get("grad_accum", 1))
        out.append(f"- tokens per step and GPU: {per_step:,} (batch {train_cfg.get('batch_size')} x "
                   f"{train_cfg.get('block_size') or cfg.block_size} tokens x {train_cfg.get('grad_accum', 1)} "
                   f"accumulation steps): {per_step * steps / 1e6:,.1f}M tokens on one GPU")
        out.append(f"- learning rate {train_cfg.get('learning_rate')} -> {train_cfg.get('min_lr')} (cosine, "
                   f"{train_cfg.get('warmup_iters')} warmup steps), AdamW, weight decay {train_cfg.get('weight_decay')}")
    if meta:
        src = meta.get("source") or {}
        what = {"hub": f"Hugging Face dataset `{src.get('dataset')}`", "builtin": "storyseek's builtin story generator",
                "files": "local files: " + ", ".join(f"`{Path(f[0]).name}`" for f in src.get("files", [])[:5])
                }.get(src.get("kind"), "prepared data")
        splits = meta.get("splits") or {}
        tokens = ", ".join(f"{s} {v.get('tokens', 0):,} tokens / {v.get('documents', 0):,} documents"
                           for s, v in splits.items())
        out.append(f"- data: {what}; {tokens}")
    losses = _final_losses(run_dir)
    if losses:
        out.append("- final losses (step {iteration}): ".format(**losses)
                   + ", ".join(f"{k} {float(v):.4f}" for k, v in losses.items() if k != "iteration" and v not in ("", None)))
    elif state.get("best_val_loss") is not None:
        out.append(f"- best validation loss: {float(state['best_val_loss']):.4f}")
    return out


def _final_losses(run_dir: Path) -> dict:
    """The last evaluated row of the run's training_log.csv: iteration, train/val/mtp losses."""
    path = Path(run_dir) / METRICS_CSV
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    if not rows:
        return {}
    keys = ("iteration", "train_loss", "val_loss", "mtp_loss")
    return {k: rows[-1].get(k) for k in keys if rows[-1].get(k) not in ("", None)}


def _data_meta(data_dir: str | None) -> dict:
    if not data_dir:
        return {}
    try:
        return json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"
