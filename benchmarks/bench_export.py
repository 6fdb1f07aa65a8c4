"""The same exported weights decoded by storyseek and by `transformers` (DeepseekV3ForCausalLM), side by side.

    python benchmarks/bench_export.py                     # default preset, random weights, 256 new tokens
    python benchmarks/bench_export.py --quick             # tiny preset, 64 new tokens
    python benchmarks/bench_export.py --model out/best_model.pt   # a trained model (MTP drafts get accepted)
    python benchmarks/bench_export.py --json              # also print the results as JSON

Both decode greedily, batch 1, exactly N new tokens (stops disabled), fp32, after one warm-up run.
storyseek: latent cache + absorbed attention, with and without MTP self-speculative drafts;
transformers: its own cache (DynamicCache; it also caches MLA's latent but re-expands K/V every
step), with and without `generate(use_mtp=True)`. KV bytes/token: storyseek's preallocated cache
(trunk + MTP layer) and the tensors in transformers' returned cache, divided by the sequence length.
With random weights MTP drafts are rejected, so MTP rows show the cost of drafting, not its gain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 32


def _export(model_path: str | None, preset: str, directory: Path) -> Path:
    from storyseek.data.tokenizer import BPETokenizer, GPT2Tokenizer
    from storyseek.export.hf import export_model
    from storyseek.model import Transformer, get_preset, pad_vocab
    from storyseek.checkpoint import save_checkpoint

    if model_path is None:
        if preset == "default":
            tok = GPT2Tokenizer()
        else:
            tok = BPETokenizer.train(4096, ["Once upon a time there was a little fox who loved the moon."] * 50)
        cfg = get_preset(preset).replace(vocab_size=pad_vocab(tok.vocab_size))
        torch.manual_seed(0)
        model_path = directory / "ckpt.pt"
        save_checkpoint(model_path, {"model_config": cfg.to_dict(), "tokenizer": tok.to_dict(),
                                     "model": Transformer(cfg).state_dict(), "iter": 0})
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the report (--json)
        return export_model(model_path, directory / "hf")


def best_time(fn, repeats: int):
    """(best wall seconds over `repeats` runs after one warm-up, the last run's result): the run
    least disturbed by other processes."""
    fn()
    best, result = float("inf"), None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, result


def sync() -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it (nothing on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def run(quick: bool, model: str | None = None, new_tokens: int | None = None, device: str = "cpu") -> dict:
    import transformers

    from storyseek.generate.decode import DecodeStats, GenerateConfig, generate_ids
    from storyseek.generate.load import load_model
    from storyseek.generate.sampling import SamplingConfig

    n = new_tokens or (64 if quick else 256)
    repeats = 1 if quick else 2
    with tempfile.TemporaryDirectory() as tmp:
        directory = _export(model, "tiny" if quick else "default", Path(tmp))
        ours, tok = load_model(directory, device=device, dtype="float32")
        cfg = ours.cfg
        prompt = torch.randint(0, tok.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(device)
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
        hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.n_layer}\..*"]  # where our MTP layer is
        results: dict = {"model": model or f"{'tiny' if quick else 'default'} preset, random weights",
                         "new_tokens": n, "prompt_tokens": PROMPT_TOKENS, "device": str(device),
                         "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
                         "rows": []}

        def storyseek(speculative: bool):
            stats = DecodeStats()
            gen = GenerateConfig(max_tokens=n, sampling=SamplingConfig(temperature=0), speculative=speculative)
            (row,) = generate_ids(ours, [prompt[0].tolist()], gen, vocab_size=tok.vocab_size, stats=stats)
            assert len(row) == n
            return stats

        def hf_generate(use_mtp: bool):
            kw = {"use_mtp": True} if use_mtp else {}
            return hf.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                               return_dict_in_generate=True, **kw)

        cache_bytes = ours.new_cache(1).nbytes_per_token()
        modes = [("storyseek", False), ("storyseek", True)] if cfg.mtp_depth else [("storyseek", False)]
        modes += [("transformers", False), ("transformers", True)] if cfg.mtp_depth else [("transformers", False)]
        for engine, mtp in modes:
            if engine == "storyseek":
                seconds, stats = best_time(lambda: storyseek(mtp), repeats)
                row = {"kv_bytes_per_token": cache_bytes, "acceptance": stats.acceptance_rate}
            else:
                seconds, out = best_time(lambda: hf_generate(mtp), repeats)
                length = out.sequences.shape[1] - 1  # the last token is never fed back
                cache = getattr(out, "cache", None) or out.past_key_values
                tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
                row = {"kv_bytes_per_token": sum(t.numel() * t.element_size() for t in tensors) // length,
                       "acceptance": None}
            row.update(engine=engine, mtp=mtp, seconds=seconds, tokens_per_s=n / seconds)
            results["rows"].append(row)
        base = results["rows"][0]["tokens_per_s"]
        for row in results["rows"]:
            row["speed_vs_storyseek"] = row["tokens_per_s"] / base
    return results


def markdown(res: dict) -> str:
    lines = [f"{res['model']}; greedy, batch 1, {res['prompt_tokens']}-token prompt, {res['new_tokens']} new tokens, "
             f"fp32 on {res['device']} ({res['torch_threads']} CPU threads), transformers {res['transformers']}.", "",
             "| decoder | tokens/s | vs storyseek | KV cache bytes/token | MTP draft acceptance |",
             "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        name = f"{r['engine']}{' + MTP (use_mtp=True)' if r['engine'] == 'transformers' and r['mtp'] else ' + MTP drafts' if r['mtp'] else ''}"
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speed_vs_storyseek']:.2f}x | "
                     f"{r['kv_bytes_per_token']:,} | {acc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, 64 new tokens, one timed run")
    ap.add_argument("--model", help="a checkpoint or exported directory instead of random weights")
    ap.add_argument("--tokens", type=int, help="new tokens per run (default: 256, quick: 64)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args()
    res = run(a.quick, a.model, a.tokens, a.device)
    print(markdown(res))
    if a.json:
        print(json.dumps(res, indent=2))
    sys.exit(0)
