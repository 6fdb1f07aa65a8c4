"""Generation speed: storyseek's decoding paths side by side with transformers' DeepseekV3 and its cache.

    python benchmarks/bench_generate.py            # default preset, batch 1 and 8, 256 new tokens
    python benchmarks/bench_generate.py --quick    # tiny preset, 32 new tokens (seconds)
    python benchmarks/bench_generate.py --json

Random weights: greedy speed does not depend on what the weights are, but MTP draft acceptance does
(a random MTP module agrees with the main model by chance only). The speculative rows on random
weights therefore show the cost of drafting, not its benefit; `trained_mtp` measures acceptance and
speedup on a small model trained here for a minute on a learnable sequence task (honest, but far
easier than stories). Every configuration runs `--repeats` times interleaved; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from storyseek.generate.decode import DecodeStats, GenerateConfig, generate_ids
from storyseek.generate.load import to_inference
from storyseek.generate.sampling import SamplingConfig
from storyseek.model import Transformer, get_preset
from storyseek.model.info import cache_bytes_per_token

GREEDY = SamplingConfig(temperature=0)
PROMPT_LEN = 16


def hf_model(cfg, dtype: torch.dtype):
    """transformers' DeepseekV3ForCausalLM with the same dimensions, configured as our export is."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from storyseek.checkpoint.hf import hf_config

    hf_cfg = DeepseekV3Config(**hf_config(cfg, eot_id=0, dtype=torch.float32))
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(hf_cfg).to(dtype).eval()


def time_hf(model, batch: int, new_tokens: int, prompt: torch.Tensor) -> tuple[float, float]:
    """-> (seconds for `new_tokens` greedy tokens with generate() and its DynamicCache, seconds to first token)."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    idx = prompt[:batch].to(model.device)
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(idx, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - t
    assert out.shape[1] == PROMPT_LEN + new_tokens
    return total, first


def time_ours(model, batch: int, new_tokens: int, prompt: torch.Tensor, **kw) -> DecodeStats:
    stats = DecodeStats()
    cfg = GenerateConfig(max_tokens=new_tokens, sampling=GREEDY, **kw)
    rows = generate_ids(model, prompt[:batch].tolist(), cfg, stats=stats)
    assert all(len(r) == new_tokens for r in rows)
    return stats


def train_counting_model(cfg, steps: int) -> Transformer:
    """A model whose MTP is actually trained: sequences that count up by a per-sequence stride."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        start = torch.randint(0, cfg.vocab_size, (16, 1))
        stride = torch.randint(1, 4, (16, 1))
        seq = (start + stride * torch.arange(65)) % cfg.vocab_size
        loss = model(seq[:, :-1], seq[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run(quick: bool = False, repeats: int = 3, new_tokens: int | None = None, batches=(1, 8),
        no_cache: bool = True, hf: bool = True, device: str = "cpu") -> dict:
    cfg = get_preset("tiny" if quick else "default")
    new_tokens = new_tokens or (32 if quick else 256)
    torch.manual_seed(0)
    base = Transformer(cfg)
    models = {"float32": to_inference(base.to(device), torch.float32)}
    bf16 = to_inference(Transformer(cfg).to(device), torch.bfloat16)
    bf16.load_state_dict(base.state_dict())
    models["bfloat16"] = bf16
    prompt = torch.randint(0, cfg.vocab_size - 64, (max(batches), PROMPT_LEN))
    hf_models = {name: hf_model(cfg, getattr(torch, name)).to(device) for name in models} if hf else {}

    rows = []
    for batch in batches:
        configs = []
        for dt, m in models.items():
            if hf:
                configs.append((f"transformers DeepseekV3 + DynamicCache, {dt}", lambda m=hf_models[dt]: time_hf(m, batch, new_tokens, prompt)))
            if no_cache and dt == "float32" and batch == 1:  # batch 8 x 256 steps of full forwards: minutes
                configs.append((f"storyseek no cache (reference), {dt}", lambda m=m: time_ours(m, batch, new_tokens, prompt, use_cache=False)))
            configs.append((f"storyseek latent cache, {dt}", lambda m=m: time_ours(m, batch, new_tokens, prompt, speculative=False)))
            configs.append((f"storyseek cache + MTP speculative (random MTP), {dt}",
                            lambda m=m: time_ours(m, batch, new_tokens, prompt, speculative=True)))
        samples: dict[str, list] = {name: [] for name, _ in configs}
        for _ in range(repeats):  # interleaved, so a noisy neighbour hits every configuration alike
            for name, fn in configs:
                samples[name].append(fn())
                got = samples[name][-1]
                secs = got.total_s if isinstance(got, DecodeStats) else got[0]
                print(f"batch {batch}: {name}: {batch * new_tokens / secs:.1f} tokens/s", file=sys.stderr, flush=True)
        for name, got in samples.items():
            if isinstance(got[0], DecodeStats):
                total = statistics.median(s.total_s for s in got)
                first = statistics.median(s.first_token_s for s in got)
                acc = got[0].acceptance_rate
            else:
                total, first, acc = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got), None
            rows.append({"batch": batch, "path": name, "tokens_per_s": batch * new_tokens / total,
                         "first_token_ms": first * 1000, "acceptance": acc})

    out = {"preset": "tiny" if quick else "default", "new_tokens": new_tokens, "prompt_tokens": PROMPT_LEN,
           "device": device, "threads": torch.get_num_threads(), "rows": rows,
           "kv_cache_bytes_per_token": {
               "storyseek latent, float32": cache_bytes_per_token(cfg, 4)["latent"],
               "storyseek latent, bfloat16": cache_bytes_per_token(cfg, 2)["latent"],
               "transformers DeepseekV3 (caches expanded k/v), float32": cache_bytes_per_token(cfg, 4)["mha"]}}

    # Speculative speedup where MTP is trained (a small model; acceptance and speedup, batch 1).
    small = get_preset("tiny").replace(vocab_size=256, block_size=128)
    trained = train_counting_model(small, 60 if quick else 200).to(device)
    sp = {"plain": [], "spec": []}
    prompts = [[(7 + 2 * i) % small.vocab_size for i in range(PROMPT_LEN)]]
    for _ in range(repeats):
        for k, spec in (("plain", False), ("spec", True)):
            stats = DecodeStats()
            generate_ids(trained, prompts, GenerateConfig(max_tokens=100, sampling=GREEDY, speculative=spec), stats=stats)
            sp[k].append(stats)
    plain_tps = statistics.median(s.tokens_per_s for s in sp["plain"])
    spec_tps = statistics.median(s.tokens_per_s for s in sp["spec"])
    out["trained_mtp"] = {"model": "tiny preset, vocab 256, trained on counting sequences", "batch": 1,
                          "plain_tokens_per_s": plain_tps, "speculative_tokens_per_s": spec_tps,
                          "speedup": spec_tps / plain_tps, "acceptance": sp["spec"][0].acceptance_rate}
    return out


def ratio(rows, batch, num, den):
    get = {r["path"]: r["tokens_per_s"] for r in rows if r["batch"] == batch}
    return get[num] / get[den] if num in get and den in get else None


def markdown(res: dict) -> str:
    lines = [f"preset {res['preset']}, prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens, greedy, "
             f"{res['device']}, {res['threads']} threads, medians", "",
             "| batch | path | tokens/s | first token (ms) | MTP acceptance |", "|---|---|---:|---:|---:|"]
    for r in res["rows"]:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(f"| {r['batch']} | {r['path']} | {r['tokens_per_s']:.1f} | {r['first_token_ms']:.0f} | {acc} |")
    lines += ["", "| ratio (tokens/s) | batch 1 | batch 8 |", "|---|---:|---:|"]
    hf32 = "transformers DeepseekV3 + DynamicCache, float32"
    for label, num, den in [
        ("storyseek cache fp32 / transformers fp32", "storyseek latent cache, float32", hf32),
        ("storyseek cache bf16 / transformers fp32", "storyseek latent cache, bfloat16", hf32),
        ("storyseek cache bf16 / transformers bf16", "storyseek latent cache, bfloat16", "transformers DeepseekV3 + DynamicCache, bfloat16"),
        ("storyseek cache fp32 / storyseek no cache", "storyseek latent cache, float32", "storyseek no cache (reference), float32"),
    ]:
        vals = [ratio(res["rows"], b, num, den) for b in (1, 8)]
        lines.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.2f}x" for v in vals) + " |")
    lines += ["", "| KV cache bytes per token (all layers) | bytes |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in res["kv_cache_bytes_per_token"].items()]
    t = res["trained_mtp"]
    lines += ["", f"MTP speculative on a trained model ({t['model']}, batch 1, 100 tokens): plain "
              f"{t['plain_tokens_per_s']:.1f} tokens/s, speculative {t['speculative_tokens_per_s']:.1f} tokens/s "
              f"= {t['speedup']:.2f}x at {t['acceptance']:.0%} acceptance"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, 32 tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-no-cache", action="store_true", help="skip the slow reference path")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args()
    res = run(args.quick, args.repeats, args.new_tokens, tuple(args.batches), not args.skip_no_cache, not args.skip_hf,
              args.device)
    print(json.dumps(res, indent=2) if args.json else markdown(res))


if __name__ == "__main__":
    sys.exit(main())
