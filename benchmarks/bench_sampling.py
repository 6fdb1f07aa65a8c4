"""The cost of choosing a token: storyseek's sampling against the straightforward one, per decode step.

    python benchmarks/bench_sampling.py            # GPT-2's 50,304-row vocabulary, batch 1 and 8
    python benchmarks/bench_sampling.py --json

Default sampling (temperature 0.8, top-p 0.9) on logits of a chosen sharpness, from a nucleus of one token
(a trained model, most steps) to tens of thousands (a random model). "full sort" is the usual way, and
transformers' TopPLogitsWarper's: sort the whole vocabulary, cut the nucleus, torch.multinomial.
storyseek (generate/sampling.py) sorts only the most likely tokens and draws by the inverse CDF; both
keep the same nucleus. A decode step of the default preset takes about 10 ms at batch 1 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from storyseek.generate.sampling import SamplingConfig, draw, probabilities

VOCAB = 50304
SHARPNESS = (8.0, 4.0, 3.0, 2.0, 0.5)  # logit standard deviations: a nucleus from one token to ~40k


def full_sort(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """The straightforward top-p: softmax, sort everything, cut, renormalize, torch.multinomial."""
    probs = (logits / cfg.temperature).softmax(dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= cfg.top_p
    probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1, generator=generator).squeeze(-1)


def ours(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    return draw(probabilities(logits, cfg), generator)


def run(quick: bool = False, batches=(1, 8), repeats: int | None = None) -> dict:
    cfg, g = SamplingConfig(), torch.Generator().manual_seed(0)
    repeats = repeats or (20 if quick else 100)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            for sharpness in SHARPNESS:
                logits = torch.randn(batch, VOCAB, generator=g) * sharpness
                nucleus = float((probabilities(logits, cfg) > 0).sum(-1).float().mean())
                times = {}
                for name, fn in (("full sort", full_sort), ("storyseek", ours)):
                    fn(logits, cfg, g)  # warm-up
                    samples = []
                    for _ in range(repeats):
                        t = time.perf_counter()
                        fn(logits, cfg, g)
                        samples.append(time.perf_counter() - t)
                    times[name] = statistics.median(samples) * 1000
                rows.append({"batch": batch, "logit_std": sharpness, "nucleus_tokens": nucleus,
                             "full_sort_ms": times["full sort"], "storyseek_ms": times["storyseek"]})
    return {"vocab": VOCAB, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "threads": torch.get_num_threads(), "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"vocabulary {res['vocab']}, temperature {res['temperature']}, top-p {res['top_p']}, "
             f"{res['threads']} threads, medians; milliseconds per decode step", "",
             "| batch | nucleus (tokens, mean) | full sort + multinomial | storyseek | speed-up |",
             "|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['nucleus_tokens']:,.0f} | {r['full_sort_ms']:.2f} | "
                     f"{r['storyseek_ms']:.2f} | {r['full_sort_ms'] / r['storyseek_ms']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args()
    res = run(args.quick)
    print(json.dumps(res, indent=2) if args.json else markdown(res))


if __name__ == "__main__":
    sys.exit(main())
