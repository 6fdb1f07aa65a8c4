"""Where a decode step's time goes: plain against MTP self-speculative steps, on any device.

    python benchmarks/profile_decode.py --model out/demo/best_model.pt               # CPU
    python benchmarks/profile_decode.py --model out/demo/best_model.pt --device cuda # CUDA graphs

Greedy, batch 1, a story prompt, `--tokens` new tokens. Each path decodes once to warm up (on CUDA
that records its graphs), three times timed, then once under torch.profiler. Per decode step it reports
the wall time (the best timed run: the profiler slows every operation down), the device's busy time and how
many operations ran on the device (CUDA kernels, those replayed from a CUDA graph included; on a CPU
the aten operations, whose times include the profiler's overhead), then each path's most expensive
operations.
A speculative step yields 1 + acceptance tokens, so it pays when it costs less than that many plain
steps: the table's last column.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_export import best_time, sync  # a script beside this one

REPEATS = 3  # timed runs per path


def _device_events(decode, device: torch.device) -> list:
    """The device's operations during decode(), averaged by name (torch.profiler)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        decode()
        sync()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return [e for e in prof.key_averages() if e.device_type == kind and (cuda or e.key.startswith("aten::"))]


def run(model_path: str, device_name: str = "cpu", tokens: int = 128, top: int = 8) -> dict:
    from storyseek.demo import PROMPTS
    from storyseek.generate.config import GenerateConfig, SamplingConfig
    from storyseek.generate.decode import DecodeStats, generate_ids
    from storyseek.generate.load import load_model
    from storyseek.generate.text import encode_prompt

    model, tok = load_model(model_path, device=device_name, dtype="float32")
    device = model.embed.weight.device
    prompt = encode_prompt(tok, PROMPTS[0], raw=False)
    # self time in microseconds: a CPU op's own share (its children apart), a CUDA kernel's time on the GPU
    self_us = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    rows = []
    for spec in (False, True):
        cfg = GenerateConfig(max_tokens=tokens, sampling=SamplingConfig(temperature=0), speculative=spec)

        def decode(cfg=cfg) -> DecodeStats:
            stats = DecodeStats()
            generate_ids(model, [prompt], cfg, stats=stats)
            return stats

        wall, stats = best_time(decode, REPEATS)  # its warm-up run chooses kernels, records CUDA graphs
        events = sorted(_device_events(decode, device), key=lambda e: -self_us(e))
        # batch 1: a speculative step drafts once; the prefill (the first token) counts as a step
        steps = stats.drafted + 1 if spec else stats.new_tokens
        rows.append({"path": "speculative" if spec else "plain", "tokens": stats.new_tokens, "steps": steps,
                     "acceptance": stats.accepted / stats.drafted if spec and stats.drafted else None,
                     "tokens_per_s": stats.new_tokens / wall, "wall_ms_per_step": 1e3 * wall / steps,
                     "device_ms_per_step": sum(self_us(e) for e in events) / 1e3 / steps,
                     "device_ops_per_step": sum(e.count for e in events) / steps,
                     "top": [(e.key, self_us(e) / 1e3 / steps, e.count / steps) for e in events[:top]]})
    return {"model": model_path, "device": str(device), "tokens": tokens, "rows": rows,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def markdown(res: dict) -> str:
    plain, spec = res["rows"]
    lines = [f"{res['model']} on {res['name']}: greedy, batch 1, {res['tokens']} new tokens, fp32, profiled", "",
             "| path | tokens/s | steps | wall ms/step | device ms/step | device ops/step | cost in plain steps |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        name = r["path"] + (f" ({r['acceptance']:.0%} accepted)" if r["acceptance"] is not None else "")
        cost = r["wall_ms_per_step"] / plain["wall_ms_per_step"]
        lines.append(f"| {name} | {r['tokens_per_s']:,.1f} | {r['steps']} | {r['wall_ms_per_step']:.3f} | "
                     f"{r['device_ms_per_step']:.3f} | {r['device_ops_per_step']:.0f} | {cost:.2f} |")
    if spec["acceptance"] is not None:
        lines += ["", f"A speculative step pays below {1 + spec['acceptance']:.2f} plain steps (1 + acceptance)."]
    for r in res["rows"]:
        lines += ["", f"Top device operations of a {r['path']} step:", "",
                  "| operation | ms/step | calls/step |", "|---|---:|---:|"]
        lines += [f"| `{name[:90]}` | {ms:.3f} | {calls:.1f} |" for name, ms, calls in r["top"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint (with MTP) or an exported directory")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per decode (default 128)")
    args = ap.parse_args()
    print(markdown(run(args.model, args.device, args.tokens)))


if __name__ == "__main__":
    main()
