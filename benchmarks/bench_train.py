"""Training throughput: storyseek vs transformers' DeepseekV3ForCausalLM, side by side in one run.

One training step = forward + backward + AdamW step (+ the MoE bias update for storyseek) on a
[batch, seq] batch; tokens/s = batch * seq / median step time. The reference is built with the same
dimensions (architecture notes 2.6: num_key_value_heads = n_head, n_group = topk_group = 1, tied
embeddings, first_k_dense_replace = n_dense_layers, q_lora_rank None) and trained with torch's AdamW.
Variants are timed in interleaved rounds so a noisy machine hurts them alike.

    python benchmarks/bench_train.py                 # default + tiny presets, batch 4 x 256
    python benchmarks/bench_train.py --quick         # tiny only, fewer steps
    python benchmarks/bench_train.py --json          # also print the results as JSON
On a GPU it adds bf16 + torch.compile rows for storyseek and their MFU (active parameters).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from storyseek.model import ModelConfig, Transformer, get_preset
from storyseek.model.info import count_parameters
from storyseek.train.metrics import flops_per_token, gpu_peak_flops
from storyseek.train.optim import configure_optimizer
from storyseek.train.precision import autocast, resolve_dtype


def reference_model(cfg: ModelConfig) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM with the same dimensions, configured as our export is."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from storyseek.checkpoint.hf import hf_config

    hf = DeepseekV3Config(**hf_config(cfg.replace(mtp_depth=0), eot_id=0, dtype=torch.float32),
                          attn_implementation="sdpa")
    return DeepseekV3ForCausalLM(hf)


def make_step(kind: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, batch: int, seq: int,
              compile_: bool = False):
    """A closure running one training step; the model and optimizer live inside it."""
    torch.manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    if kind == "storyseek":
        model = Transformer(cfg).to(device)
        opt = configure_optimizer(model, 3e-4, 0.1, (0.9, 0.95), device.type)
        fwd = torch.compile(model) if compile_ else model

        def loss():
            return fwd(x, y).loss
    else:
        model = reference_model(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                fused=device.type == "cuda")

        def loss():
            return model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
    model.train()

    def step():
        with autocast(device, dtype):
            l = loss()
        l.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "storyseek":
            model.update_expert_bias()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def run(quick: bool = False, presets: tuple[str, ...] | None = None, batch: int = 4, seq: int = 256,
        rounds: int | None = None, steps: int | None = None, device_name: str | None = None) -> dict:
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    presets = presets or (("tiny",) if quick else ("default", "tiny"))
    rounds, steps = rounds or (2 if quick else 3), steps or (2 if quick else 3)
    auto, why = resolve_dtype("auto", device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x {torch.get_num_threads()} threads",
               "batch": batch, "seq": seq, "auto_dtype": str(auto).replace("torch.", ""), "auto_why": why, "rows": []}
    for preset in presets:
        cfg = get_preset(preset)
        variants = [("transformers DeepseekV3 fp32", "hf", cfg, torch.float32, False),
                    ("storyseek fp32", "storyseek", cfg, torch.float32, False),
                    ("storyseek fp32, no MTP", "storyseek", cfg.replace(mtp_depth=0), torch.float32, False)]
        if auto != torch.float32:
            variants += [(f"storyseek auto ({results['auto_dtype']})", "storyseek", cfg, auto, False),
                         (f"storyseek auto ({results['auto_dtype']}), no MTP", "storyseek", cfg.replace(mtp_depth=0), auto, False)]
        if device.type == "cuda":
            variants += [(f"storyseek auto + compile", "storyseek", cfg, auto, True),
                         (f"storyseek auto + compile, no MTP", "storyseek", cfg.replace(mtp_depth=0), auto, True)]
        fns = {}
        for name, kind, c, dtype, comp in variants:
            fns[name] = make_step(kind, c, dtype, device, batch, seq, comp)
            for _ in range(2 if not comp else 3):  # warm up (allocator, compile)
                fns[name]()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                for _ in range(steps):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
        ref = batch * seq / statistics.median(times["transformers DeepseekV3 fp32"])
        peak = gpu_peak_flops(device)
        for name, kind, c, dtype, comp in variants:
            tps = batch * seq / statistics.median(times[name])
            p = count_parameters(c)
            mfu = flops_per_token(c, seq, p["active"], p["mtp"]) * tps / peak if peak and kind == "storyseek" else None
            results["rows"].append({"preset": preset, "variant": name, "tokens_per_sec": round(tps, 1),
                                    "vs_reference_fp32": round(tps / ref, 2), "mfu": round(mfu, 3) if mfu else None})
        del fns
    return results


def markdown(results: dict) -> str:
    lines = [f"training tokens/s (fwd + bwd + AdamW), batch {results['batch']} x {results['seq']}, "
             f"{results['device']}; --dtype auto -> {results['auto_why']}", "",
             "| preset | variant | tokens/s | vs transformers fp32 | MFU |", "|---|---|---:|---:|---:|"]
    for r in results["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        lines.append(f"| {r['preset']} | {r['variant']} | {r['tokens_per_sec']:,.0f} | {r['vs_reference_fp32']:.2f}x | {mfu} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset only, fewer steps")
    ap.add_argument("--presets", nargs="+", choices=["default", "tiny"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int, help="timed steps per variant per round")
    ap.add_argument("--device")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args()
    results = run(a.quick, tuple(a.presets) if a.presets else None, a.batch, a.seq, a.rounds, a.steps, a.device)
    print(markdown(results))
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
