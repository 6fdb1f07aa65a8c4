"""The same weights decoded by storyseek and by llama.cpp (llama-cpp-python) from our GGUF export.

    python benchmarks/bench_gguf.py                          # default preset, random weights, 256 new tokens
    python benchmarks/bench_gguf.py --preset tiny            # the demo's 4 x 128 shape
    python benchmarks/bench_gguf.py --model demo-run/best_model.pt
    python benchmarks/bench_gguf.py --threads 2 --json

Greedy, batch 1, a 32-token prompt, exactly N new tokens (stops ignored), prompt processing
included. storyseek: fp32 weights, latent cache, with MTP drafts off and on. llama.cpp: the file
from `storyseek export --format gguf` for each --gguf-type, its own greedy sampler, default KV
cache (f16). The engines take turns, `--repeats` rounds; the best time of each counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 32


def _checkpoint(model_path: str | None, preset: str, directory: Path) -> Path:
    from storyseek.checkpoint import save_checkpoint
    from storyseek.data.tokenizer import BPETokenizer, GPT2Tokenizer
    from storyseek.model import Transformer, get_preset, pad_vocab

    if model_path:
        return Path(model_path)
    tok = GPT2Tokenizer() if preset == "default" else BPETokenizer.train(
        4096, ["Once upon a time there was a little fox who loved the moon."] * 50)
    cfg = get_preset(preset).replace(vocab_size=pad_vocab(tok.vocab_size))
    torch.manual_seed(0)
    path = directory / "ckpt.pt"
    save_checkpoint(path, {"model_config": cfg.to_dict(), "tokenizer": tok.to_dict(),
                           "model": Transformer(cfg).state_dict(), "iter": 0})
    return path


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(model: str | None, preset: str, n: int, threads: int, types: list[str], repeats: int) -> dict:
    import llama_cpp

    from storyseek.export.gguf import export_gguf
    from storyseek.generate.config import GenerateConfig, SamplingConfig
    from storyseek.generate.decode import generate_ids
    from storyseek.generate.load import load_model

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(model, preset, Path(tmp))
        ours, tok = load_model(ckpt, device="cpu", dtype="float32")
        prompt = torch.randint(0, tok.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
        engines = {}
        for speculative in ([False, True] if ours.cfg.mtp_depth else [False]):
            gen = GenerateConfig(max_tokens=n, sampling=SamplingConfig(temperature=0), speculative=speculative)
            engines[f"storyseek fp32{' + MTP drafts' if speculative else ''}"] = (
                lambda gen=gen: generate_ids(ours, [prompt], gen, vocab_size=tok.vocab_size))
        sizes = {}
        for kind in types:
            path = export_gguf(ckpt, Path(tmp) / f"m-{kind}.gguf", gguf_type=kind)
            sizes[kind] = path.stat().st_size
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_TOKENS + n + 8, n_threads=threads,
                                  n_threads_batch=threads, verbose=False)

            def llama(llm=llm):
                out = []
                for t in llm.generate(prompt, temp=0.0, reset=True):
                    out.append(t)
                    if len(out) == n:
                        return [out]

            engines[f"llama.cpp {kind}"] = llama
        best = {name: float("inf") for name in engines}
        for name, fn in engines.items():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in engines.items():
                t = time.perf_counter()
                (row,) = fn()
                best[name] = min(best[name], time.perf_counter() - t)
                assert len(row) == n, (name, len(row))
        base = n / best[next(iter(engines))]
        rows = [{"engine": name, "seconds": s, "tokens_per_s": n / s, "vs_storyseek": n / s / base,
                 "file_bytes": sizes.get(name.removeprefix("llama.cpp "))} for name, s in best.items()]
    return {"model": model or f"{preset} preset, random weights", "new_tokens": n, "prompt_tokens": PROMPT_TOKENS,
            "threads": threads, "cpu": _cpu(), "load_before": os.getloadavg()[0],
            "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"{res['model']}; greedy, batch 1, {res['prompt_tokens']}-token prompt, {res['new_tokens']} new tokens, "
             f"{res['threads']} threads, {res['cpu']} (load average {res['load_before']:.1f} at the start), "
             f"llama-cpp-python {res['llama_cpp_python']}, torch {res['torch']}.", "",
             "| decoder | tokens/s | vs storyseek fp32 | GGUF file |", "|---|---:|---:|---:|"]
    for r in res["rows"]:
        size = "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 2**20:.1f} MiB"
        lines.append(f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['vs_storyseek']:.2f}x | {size} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint or exported directory instead of random weights")
    ap.add_argument("--preset", default="default", choices=("default", "tiny"), help="shape for random weights")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per run (default: 256)")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="CPU threads for both engines")
    ap.add_argument("--types", default="f32,q8_0", help="GGUF types to run (default: f32,q8_0)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args()
    res = run(a.model, a.preset, a.tokens, a.threads, a.types.split(","), a.repeats)
    print(markdown(res))
    if a.json:
        print(json.dumps(res, indent=2))
