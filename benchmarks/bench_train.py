"""Training throughput: storyseek vs transformers' DeepseekV3ForCausalLM, side by side in one run.

One training step = forward + backward + AdamW step (+ the MoE bias update for storyseek) on a
[batch, seq] batch; tokens/s = batch * seq / median step time. The reference is built with the same
dimensions (architecture notes 2.6: num_key_value_heads = n_head, n_group = topk_group = 1, tied
embeddings, first_k_dense_replace = n_dense_layers, q_lora_rank None) and trained with torch's AdamW,
in fp32 and in the device's --dtype auto precision: it is met at its best, not only in fp32.
Variants are timed in interleaved rounds so a noisy machine hurts them alike. On a CPU the process
keeps freed memory for reuse, as `storyseek train` does (device.keep_freed_memory), for every row.

Utilization: on a CPU, model FLOPs/s over the fp32 GEMM rate of the output head's shape
([batch * seq, n_embd] x [n_embd, vocab]) measured in the same rounds; on a GPU, MFU (active
parameters, against the GPU's dense bf16 peak). The --compile rows report the compile time apart
(the first steps) and the tokens/s after it.

    python benchmarks/bench_train.py                 # default + tiny presets, batch 4 x 256
    python benchmarks/bench_train.py --quick         # tiny only, fewer steps
    python benchmarks/bench_train.py --no-compile    # skip the torch.compile rows (minutes on a CPU)
    python benchmarks/bench_train.py --json          # also print the results as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from storyseek.device import autocast, keep_freed_memory, resolve_device, resolve_dtype
from storyseek.model import ModelConfig, Transformer, get_preset
from storyseek.model.info import count_parameters
from storyseek.train.metrics import flops_per_token, gpu_peak_flops
from storyseek.train.optim import configure_optimizer

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


def head_gemm(cfg: ModelConfig, device: torch.device, batch: int, seq: int):
    """One fp32 matmul of the output head's shape: the CPU's attainable rate for this model."""
    x = torch.randn(batch * seq, cfg.n_embd, device=device)
    w = torch.randn(cfg.n_embd, cfg.vocab_size, device=device)

    def gemm():
        x @ w
        if device.type == "cuda":
            torch.cuda.synchronize()

    return gemm


def run(quick: bool = False, presets: tuple[str, ...] | None = None, batch: int = 4, seq: int = 256,
        rounds: int | None = None, steps: int | None = None, device_name: str | None = None,
        compile_: bool = True) -> dict:
    device = resolve_device(device_name or "auto")
    # As `storyseek train` on a CPU: freed memory kept for the next step (process-wide, so for
    # transformers' rows too).
    kept = device.type == "cpu" and keep_freed_memory()
    presets = presets or (("tiny",) if quick else ("default", "tiny"))
    rounds, steps = rounds or (2 if quick else 3), steps or (2 if quick else 3)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x {torch.get_num_threads()} threads",
               "load_average": os.getloadavg()[0], "batch": batch, "seq": seq, "freed_memory_kept": kept, "rows": []}
    for preset in presets:
        cfg = get_preset(preset)
        shapes = [(batch * seq, cfg.n_embd, cfg.vocab_size), (batch * seq, cfg.n_embd, cfg.moe_inter_dim)]
        auto, why = resolve_dtype("auto", device, shapes)
        name = str(auto).replace("torch.", "")
        results.setdefault("auto", {})[preset] = why
        no_mtp = cfg.replace(mtp_depth=0)
        variants = [("transformers DeepseekV3 fp32", "hf", cfg, torch.float32, False)]
        if auto != torch.float32:
            variants += [(f"transformers DeepseekV3 {name}", "hf", cfg, auto, False)]
        variants += [("storyseek fp32", "storyseek", cfg, torch.float32, False),
                     ("storyseek fp32, no MTP", "storyseek", no_mtp, torch.float32, False)]
        if auto != torch.float32:
            variants += [(f"storyseek auto ({name})", "storyseek", cfg, auto, False),
                         (f"storyseek auto ({name}), no MTP", "storyseek", no_mtp, auto, False)]
        if compile_:
            variants += [(f"storyseek auto ({name}) + compile", "storyseek", cfg, auto, True),
                         (f"storyseek auto ({name}) + compile, no MTP", "storyseek", no_mtp, auto, True)]
        fns, compile_s = {}, {}
        for vname, kind, c, dtype, comp in variants:
            fns[vname] = make_step(kind, c, dtype, device, batch, seq, comp)
            t = time.perf_counter()
            fns[vname]()  # the first step compiles
            compile_s[vname] = time.perf_counter() - t if comp else None
            fns[vname]()  # warm up (allocator)
        fns["gemm"] = head_gemm(cfg, device, batch, seq)
        times: dict[str, list[float]] = {vname: [] for vname in fns}
        for _ in range(rounds):
            for vname, fn in fns.items():
                for _ in range(steps):
                    t = time.perf_counter()
                    fn()
                    times[vname].append(time.perf_counter() - t)
        tps = {vname: batch * seq / statistics.median(times[vname]) for vname, *_ in variants}
        ref = tps["transformers DeepseekV3 fp32"]
        best_ref = max(v for k, v in tps.items() if k.startswith("transformers"))
        gemm_rate = 2 * batch * seq * cfg.n_embd * cfg.vocab_size / min(times["gemm"])  # FLOP/s
        peak = gpu_peak_flops(device)
        for vname, kind, c, dtype, comp in variants:
            fc = c if kind == "storyseek" else no_mtp  # transformers trains no MTP
            p = count_parameters(fc)
            flops = flops_per_token(fc, seq, p["active"], p["mtp"]) * tps[vname]
            results["rows"].append({
                "preset": preset, "variant": vname, "tokens_per_sec": round(tps[vname], 1),
                "vs_reference_fp32": round(tps[vname] / ref, 2), "vs_reference_best": round(tps[vname] / best_ref, 2),
                "utilization": round(flops / (peak or gemm_rate), 3), "compile_s": round(compile_s[vname], 1) if comp else None})
        results.setdefault("head_gemm_gflops", {})[preset] = round(gemm_rate / 1e9, 1)
        del fns
    results["utilization_is"] = "MFU (bf16 peak)" if device.type == "cuda" and gpu_peak_flops(device) else "of the fp32 head GEMM rate"
    return results


def markdown(results: dict) -> str:
    auto = "; ".join(f"{k}: {v}" for k, v in results["auto"].items())
    gemm = ", ".join(f"{k} {v:,.0f}" for k, v in results["head_gemm_gflops"].items())
    kept = "freed memory kept for reuse (device.keep_freed_memory), every row; " if results["freed_memory_kept"] else ""
    lines = [f"training tokens/s (fwd + bwd + AdamW), batch {results['batch']} x {results['seq']}, "
             f"{results['device']}, load average {results['load_average']:.1f}; --dtype auto -> {auto}; {kept}"
             f"fp32 head GEMM GFLOP/s: {gemm}", "",
             f"| preset | variant | tokens/s | vs transformers fp32 | vs transformers best | utilization ({results['utilization_is']}) | compile s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
        lines.append(f"| {r['preset']} | {r['variant']} | {r['tokens_per_sec']:,.0f} | {r['vs_reference_fp32']:.2f}x "
                     f"| {r['vs_reference_best']:.2f}x | {100 * r['utilization']:.0f}% | {comp} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset only, fewer steps")
    ap.add_argument("--presets", nargs="+", choices=["default", "tiny"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int, help="timed steps per variant per round")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args()
    results = run(a.quick, tuple(a.presets) if a.presets else None, a.batch, a.seq, a.rounds, a.steps, a.device, not a.no_compile)
    print(markdown(results))
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
