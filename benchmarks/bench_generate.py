"""Generation speed: storyseek's decoding paths side by side with transformers' DeepseekV3 and its cache.

    python benchmarks/bench_generate.py            # default preset, batch 1 and 8, 256 new tokens
    python benchmarks/bench_generate.py --quick    # tiny preset, 32 new tokens (seconds)
    python benchmarks/bench_generate.py --json

Random weights: greedy speed does not depend on what the weights are, but MTP draft acceptance does
(a random MTP module agrees with the main model by chance only). The speculative rows on random
weights therefore show the cost of drafting, not its benefit. The `trained` section trains the tiny
preset on the embedded story corpus for `--train-minutes` inside the benchmark, then decodes story
prompts greedily (acceptance on real text): plain, speculative, auto, and transformers on the same
weights, all on `--device` (also `--compile`; on CUDA also without CUDA graphs). Every
configuration runs `--repeats` times interleaved; medians are reported.

Each row also reports its share of the weight-read limit: batch-1 decoding must read every weight a
token touches (attention, dense FFN, shared + top-k experts, the vocab-sized head), so tokens/s can
never exceed memory bandwidth / bytes per token. The bandwidth is measured in the same run (a sum
over a buffer far larger than the caches); at batch B one step reads the weights once for B tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

from storyseek.generate.decode import DecodeStats, GenerateConfig, generate_ids
from storyseek.generate.load import to_inference
from storyseek.generate.sampling import SamplingConfig
from storyseek.model import Transformer, get_preset
from storyseek.model.info import cache_bytes_per_token
from storyseek.model.linear import Linear, set_weight_major_rows
from storyseek.model.moe import MoE

from bench_export import best_time  # a script beside this one

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
    assert out.shape[1] == idx.shape[1] + new_tokens
    return total, first


def time_ours(model, batch: int, new_tokens: int, prompt: torch.Tensor, **kw) -> DecodeStats:
    stats = DecodeStats()
    cfg = GenerateConfig(max_tokens=new_tokens, sampling=GREEDY, **kw)
    rows = generate_ids(model, prompt[:batch].tolist(), cfg, stats=stats)
    assert all(len(r) == new_tokens for r in rows)
    stats.rows = rows
    return stats


def read_bandwidth(device: str = "cpu", mib: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth of `device` in bytes/s: the best of `repeats` sums over a `mib` MiB fp32 buffer."""
    x = torch.ones(mib * 2**18, device=device)
    return x.numel() * 4 / best_time(x.sum, repeats)[0]  # (its warm-up sum loads the kernel)


def bytes_per_step(model: Transformer, batch: int) -> float:
    """Weight bytes one decode step must read for `batch` tokens (one per row): every trunk weight
    but the embedding table (one row per token) and the MTP module (plain decoding never runs it),
    the whole head (tied to the embedding, named_parameters lists it once, as embed.weight); of a
    MoE layer's routed experts, those the batch is expected to choose: E (1 - (1 - k/E)^batch).
    The fused experts (model/moe.py) read all of them where that measured faster, so at batch 1 a
    step reads more than this limit counts: the share is of what the model needs, not of its reads."""
    head = model.head.weight
    total = float(head.numel() * head.element_size()) if head is model.embed.weight else 0.0
    for name, p in model.named_parameters():
        if name.startswith(("mtp.", "embed.")) or ".experts." in name:
            continue
        total += p.numel() * p.element_size()
    for moe in (block.ffn for block in model.layers if isinstance(block.ffn, MoE)):
        expert = sum(p.numel() * p.element_size() for p in moe.experts[0].parameters())
        E, k = moe.n_experts, moe.topk
        total += E * (1 - (1 - k / E) ** batch) * expert
    return total + batch * model.cfg.n_embd * model.embed.weight.element_size()


def without_weight_major(model: Transformer, fn):
    """fn() with every product in nn.Linear's x W^T layout (model/linear.py), then the measured layout back."""
    measured = {m: m.weight_major_rows for m in model.modules() if isinstance(m, Linear)}  # per weight shape
    set_weight_major_rows(model, 0)
    try:
        return fn()
    finally:
        for layer, rows in measured.items():
            layer.weight_major_rows = rows


def weight_limit(model: Transformer, batch: int, bandwidth: float) -> float:
    """tokens/s at which reading the weights alone would take all the time."""
    return bandwidth / (bytes_per_step(model, batch) / batch)


def train_story_model(directory, minutes: float, device: str = "cpu"):
    """The tiny preset trained on the embedded story corpus for `minutes` on `device` (the demo's
    recipe, shorter) -> ((model in eval mode, fp32, on `device`; tokenizer), checkpoint path)."""
    from storyseek.data.prepare import PrepareConfig, prepare
    from storyseek.generate.load import load_model
    from storyseek.train.config import build_train_config
    from storyseek.train.loop import train

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the results (--json)
        data = prepare(PrepareConfig(dataset="builtin", max_docs=20_000, tokenizer="bpe:2048", out=str(directory / "data")))
        train(build_train_config(dict(data=str(data), out=str(directory), preset="tiny", max_minutes=minutes,
                                      eval_interval=100, eval_iters=2, device=device, seed=1337,
                                      compile=False)))  # minutes: compiling would eat the budget
    best = directory / "best_model.pt"
    return load_model(best if best.exists() else directory / "final_model.pt", device=device, dtype="float32"), best


def run(quick: bool = False, repeats: int = 3, new_tokens: int | None = None, batches=(1, 8),
        no_cache: bool = True, hf: bool = True, device: str = "cpu", train_minutes: float | None = None) -> dict:
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
    bandwidth = read_bandwidth(device)

    rows, identical = [], {}
    for batch in batches:
        configs = []
        for dt, m in models.items():
            if hf:
                configs.append((f"transformers DeepseekV3 + DynamicCache, {dt}", dt, lambda m=hf_models[dt]: time_hf(m, batch, new_tokens, prompt)))
            if no_cache and dt == "float32" and batch == 1:  # batch 8 x 256 steps of full forwards: minutes
                configs.append((f"storyseek no cache (reference), {dt}", dt, lambda m=m: time_ours(m, batch, new_tokens, prompt, use_cache=False)))
            configs.append((f"storyseek latent cache, {dt}", dt, lambda m=m: time_ours(m, batch, new_tokens, prompt, speculative=False)))
            if torch.device(device).type == "cuda":  # the same steps launched one kernel at a time
                configs.append((f"storyseek latent cache, {dt}, no CUDA graphs", dt,
                                lambda m=m: time_ours(m, batch, new_tokens, prompt, speculative=False, cuda_graphs=False)))
            if m.head.weight_major_rows:  # the same path with nn.Linear's x W^T for every product
                configs.append((f"storyseek latent cache, {dt}, x W^T layout", dt,
                                lambda m=m: without_weight_major(m, lambda: time_ours(m, batch, new_tokens, prompt, speculative=False))))
            configs.append((f"storyseek cache + MTP speculative (random MTP), {dt}", dt,
                            lambda m=m: time_ours(m, batch, new_tokens, prompt, speculative=True)))
        samples: dict[str, list] = {name: [] for name, _, _ in configs}
        for _ in range(repeats):  # interleaved, so a noisy neighbour hits every configuration alike
            for name, _, fn in configs:
                samples[name].append(fn())
                got = samples[name][-1]
                secs = got.total_s if isinstance(got, DecodeStats) else got[0]
                print(f"batch {batch}: {name}: {batch * new_tokens / secs:.1f} tokens/s", file=sys.stderr, flush=True)
        for dt in models:  # CUDA graphs attend to the whole (masked) cache: the same greedy tokens?
            graphed = samples.get(f"storyseek latent cache, {dt}, no CUDA graphs")
            if graphed:
                identical[f"{dt}, batch {batch}"] = graphed[-1].rows == samples[f"storyseek latent cache, {dt}"][-1].rows
        for name, dt, _ in configs:
            got = samples[name]
            if isinstance(got[0], DecodeStats):
                total = statistics.median(s.total_s for s in got)
                first = statistics.median(s.first_token_s for s in got)
                acc, draft = got[0].acceptance_rate, got[0].draft
            else:
                total, first, acc, draft = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got), None, ""
            tps = batch * new_tokens / total
            rows.append({"batch": batch, "dtype": dt, "path": name, "tokens_per_s": tps, "first_token_ms": first * 1000,
                         "acceptance": acc, "draft": draft, "limit_share": tps / weight_limit(models[dt], batch, bandwidth)})

    out = {"preset": "tiny" if quick else "default", "new_tokens": new_tokens, "prompt_tokens": PROMPT_LEN,
           "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
           "threads": torch.get_num_threads(), "rows": rows, "cuda_graph_tokens_identical": identical,
           "weight_major_rows": {dt: m.head.weight_major_rows for dt, m in models.items()},
           "bandwidth_gb_s": bandwidth / 1e9,
           "weight_mb_per_token": {dt: {b: bytes_per_step(m, b) / b / 1e6 for b in batches} for dt, m in models.items()},
           "kv_cache_bytes_per_token": {
               "storyseek latent, float32": cache_bytes_per_token(cfg, 4)["latent"],
               "storyseek latent, bfloat16": cache_bytes_per_token(cfg, 2)["latent"],
               "transformers DeepseekV3 (caches expanded k/v), float32": cache_bytes_per_token(cfg, 4)["mha"]}}
    minutes = (0.5 if quick else 3.0) if train_minutes is None else train_minutes
    if minutes > 0:
        out["trained"] = run_trained(minutes, repeats, 64 if quick else 256, hf, bandwidth, device)
    return out


def run_trained(minutes: float, repeats: int, new_tokens: int, hf: bool, bandwidth: float, device: str = "cpu") -> dict:
    """The tiny preset trained here on stories; batch 1, greedy, a story prompt, stops disabled."""
    import tempfile
    from pathlib import Path

    from storyseek.demo import PROMPTS
    from storyseek.generate.text import encode_prompt

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        (model, tok), ckpt = train_story_model(Path(tmp), minutes, device)
        trained_s = time.perf_counter() - t
        prompt = torch.tensor([encode_prompt(tok, PROMPTS[0], raw=False)])
        configs = {"storyseek latent cache": dict(speculative=False),
                   "storyseek cache + MTP speculative": dict(speculative=True),
                   "storyseek auto (the default)": dict()}
        if torch.device(device).type == "cuda":  # CUDA graphs (the default there) against none
            configs["storyseek latent cache, --no-cuda-graphs"] = dict(speculative=False, cuda_graphs=False)
            configs["storyseek speculative, --no-cuda-graphs"] = dict(speculative=True, cuda_graphs=False)
        configs["storyseek latent cache, --compile"] = dict(speculative=False, compile=True)  # on CUDA: in the graphs
        configs["storyseek cache + MTP speculative, --compile"] = dict(speculative=True, compile=True)
        configs["storyseek auto, --compile"] = dict(compile=True)
        # Compile once (the 1-token step, then the 2-token verify), timed apart (DecodeStats.compile_s).
        compile_s = sum(time_ours(model, 1, 8, prompt, speculative=spec, compile=True).compile_s for spec in (False, True))
        fns = {name: (lambda kw=kw: time_ours(model, 1, new_tokens, prompt, **kw)) for name, kw in configs.items()}
        if hf:
            import transformers

            from storyseek.export.hf import export_model

            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the results (--json)
                hf_dir = export_model(ckpt if ckpt.exists() else Path(tmp) / "final_model.pt", Path(tmp) / "hf")
            ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
            fns["transformers DeepseekV3 + DynamicCache"] = lambda: time_hf(ref, 1, new_tokens, prompt)
        samples: dict[str, list] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                samples[name].append(fn())
        rows, limit = [], weight_limit(model, 1, bandwidth)
        for name, got in samples.items():
            total = statistics.median(g.total_s if isinstance(g, DecodeStats) else g[0] for g in got)
            stats = got[-1] if isinstance(got[-1], DecodeStats) else None
            rows.append({"path": name, "tokens_per_s": new_tokens / total, "limit_share": new_tokens / total / limit,
                         "acceptance": stats.acceptance_rate if stats else None, "auto": stats.auto if stats else "",
                         "draft": stats.draft if stats else ""})
        outputs = [samples[name][-1].rows for name in configs]
    return {"model": f"tiny preset trained {minutes:g} min ({trained_s / 60:.1f} min wall incl. data) on the embedded stories",
            "prompt": PROMPTS[0], "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens, "rows": rows,
            "compile_s": compile_s,
            "greedy_identical": all(o == outputs[0] for o in outputs)}


def ratio(rows, batch, num, den):
    get = {r["path"]: r["tokens_per_s"] for r in rows if r["batch"] == batch}
    return get[num] / get[den] if num in get and den in get else None


def markdown(res: dict) -> str:
    lines = [f"preset {res['preset']}, prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens, greedy, "
             f"{res['device']}, {res['threads']} threads, medians", "",
             "decode layout (model/linear.py, measured): weight-major up to "
             + ", ".join(f"{n} rows in {dt}" for dt, n in res["weight_major_rows"].items()), "",
             f"memory read bandwidth measured in this run: {res['bandwidth_gb_s']:.1f} GB/s; weights read per token: "
             + ", ".join(f"{dt} batch {b}: {mb:.1f} MB" for dt, per in res["weight_mb_per_token"].items() for b, mb in per.items()),
             "", "| batch | path | tokens/s | share of weight-read limit | first token (ms) | MTP acceptance |",
             "|---|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(f"| {r['batch']} | {r['path']} | {r['tokens_per_s']:.1f} | {r['limit_share']:.1%} | "
                     f"{r['first_token_ms']:.0f} | {acc} |")
    if res["cuda_graph_tokens_identical"]:
        lines += ["", "greedy tokens with CUDA graphs identical to without: "
                  + ", ".join(f"{k}: {v}" for k, v in res["cuda_graph_tokens_identical"].items())]
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
    lines += ["", "What a speculative step costs (random MTP weights draft badly, so the speculative rows above show "
              "the cost, not the gain): a step yields 1 + acceptance tokens per row, so it pays above the acceptance "
              "shown.", "", "| batch | dtype | speculative step / plain step | pays above acceptance | draft head |",
              "|---|---|---:|---:|---|"]
    for r in res["rows"]:
        if r["acceptance"] is not None:
            plain = next(p for p in res["rows"] if p["batch"] == r["batch"] and p["path"] == f"storyseek latent cache, {r['dtype']}")
            cost = (1 + r["acceptance"]) * plain["tokens_per_s"] / r["tokens_per_s"]
            lines.append(f"| {r['batch']} | {r['dtype']} | {cost:.2f} | {cost - 1:.0%} | {r['draft']} |")
    lines += ["", "| KV cache bytes per token (all layers) | bytes |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in res["kv_cache_bytes_per_token"].items()]
    t = res.get("trained")
    if t:
        lines += ["", f"{t['model']}; batch 1, greedy, the story prompt \"{t['prompt']}\" ({t['prompt_tokens']} tokens), "
                      f"{t['new_tokens']} new tokens; greedy outputs of every storyseek path identical: "
                      f"{t['greedy_identical']}"
                      + (f"; --compile compiled in {t['compile_s']:.0f} s (once, not in the rows)" if t["compile_s"] else ""), "",
                  "| path | tokens/s | share of weight-read limit | vs plain | vs transformers | MTP acceptance |",
                  "|---|---:|---:|---:|---:|---:|"]
        speed = {r["path"]: r["tokens_per_s"] for r in t["rows"]}
        hf_tps = speed.get("transformers DeepseekV3 + DynamicCache")
        for r in t["rows"]:
            acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
            vs_hf = f"{r['tokens_per_s'] / hf_tps:.2f}x" if hf_tps else ""
            lines.append(f"| {r['path']} | {r['tokens_per_s']:.1f} | {r['limit_share']:.1%} | "
                         f"{r['tokens_per_s'] / speed['storyseek latent cache']:.2f}x | {vs_hf} | {acc} |")
        lines += [f"\n{r['path']}: {'; '.join(x for x in (r['auto'], r['draft']) if x)}" for r in t["rows"] if r["auto"] or r["draft"]]
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
    ap.add_argument("--train-minutes", type=float, default=None,
                    help="train the tiny preset on stories this long for the trained-model rows (default 3, quick 0.5; 0 skips)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args()
    # Every probe measured in this run, none read from ~/.cache: the auto rows include auto's probe steps.
    os.environ.setdefault("STORYSEEK_NO_CACHE", "1")
    res = run(args.quick, args.repeats, args.new_tokens, tuple(args.batches), not args.skip_no_cache, not args.skip_hf,
              args.device, args.train_minutes)
    print(json.dumps(res, indent=2) if args.json else markdown(res))


if __name__ == "__main__":
    sys.exit(main())
