"""`storyseek eval`: held-out loss, perplexity and bits per byte per source, then optional story checks.

    storyseek eval --model out/best_model.pt --data data/stories
    storyseek eval --model out/stories-hf --files "stories/*.jsonl" notes.txt --format text --json
    storyseek eval --model out/best_model.pt --data data/stories --stories 32

Results go to stdout (a table, or one JSON object with --json); progress bars and notes to stderr.
"""

from __future__ import annotations

import json
import math
import sys

from ..errors import StoryseekError
from ..generate.config import GenerateConfig, SamplingConfig
from .config import EvalConfig
from .sources import RecordFormat, Source


def load_sources(cfg: EvalConfig) -> list[Source]:
    from .sources import data_dir_source, dataset_source, file_sources

    records = RecordFormat(cfg.format, cfg.prompt_column, cfg.text_column, cfg.max_docs)
    out = []
    if cfg.data:
        out.append(data_dir_source(cfg.data, cfg.max_docs))
    if cfg.files:
        out += file_sources(list(cfg.files), records)
    if cfg.dataset:
        out.append(dataset_source(cfg.dataset, cfg.dataset_config, cfg.split, records))
    return out


def evaluate(cfg: EvalConfig, sampling: SamplingConfig | None = None) -> dict:
    """Everything `storyseek eval` reports, as the dict --json prints; `sampling` is for the stories."""
    from ..generate.load import load_model
    from ..model.info import variant
    from .score import score
    from .stories import prompts_from_documents, prompts_from_file, sample_stories, story_checks

    sources = load_sources(cfg)  # bad paths fail before the model loads
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    param = next(model.parameters())
    report: dict = {"model": cfg.model, "variant": variant(model.cfg), "tokenizer": tokenizer.spec,
                    "block_size": model.cfg.block_size, "stride": cfg.stride or max(1, model.cfg.block_size // 2),
                    "dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device), "sources": []}
    scores = [score(model, tokenizer, s.docs, name=s.name, stride=cfg.stride, batch_size=cfg.batch_size)
              for s in sources]
    if len(scores) > 1:
        scores.append(sum(scores[1:], scores[0]))
    report["sources"] = [s.to_dict() for s in scores]
    if cfg.stories:
        if cfg.prompts:
            prompts = prompts_from_file(cfg.prompts, cfg.prompt_column)
        else:
            prompts = [p for s in sources for p in prompts_from_documents(s.docs)]
            if not prompts:
                raise StoryseekError("--stories needs prompts: give --prompts FILE, or story-format --data/--files/--dataset")
        s = sampling or SamplingConfig()
        gen = GenerateConfig(max_tokens=cfg.max_tokens, sampling=s, seed=cfg.seed)
        samples = sample_stories(model, tokenizer, prompts, cfg.stories, gen, cfg.batch_size)
        report["stories"] = {**story_checks(samples), "max_tokens": cfg.max_tokens, "temperature": s.temperature,
                             "top_p": s.top_p, "top_k": s.top_k, "repetition_penalty": s.repetition_penalty, "seed": cfg.seed,
                             "examples": [{"prompt": x.prompt.text, "text": x.text} for x in samples[:2]]}
    return report


def print_report(report: dict) -> None:
    print(f"model {report['model']}: {report['variant']}, tokenizer {report['tokenizer']}, context "
          f"{report['block_size']} (stride {report['stride']}), {report['dtype']} on {report['device']}")
    rows = report["sources"]
    if rows:
        width = max(len("source"), *(len(r["source"]) for r in rows))
        print(f"{'source':<{width}}  {'docs':>7}  {'tokens':>11}  {'bytes':>12}  {'loss':>7}  {'ppl':>8}  {'bits/byte':>9}")
        for r in rows:
            print(f"{r['source']:<{width}}  {r['documents']:>7,}  {r['tokens']:>11,}  {r['bytes']:>12,}  "
                  f"{r['loss']:>7.4f}  {r['perplexity']:>8.3f}  {r['bits_per_byte']:>9.4f}")
    st = report.get("stories")
    if st:
        print(f"story checks ({st['stories']} stories, at most {st['max_tokens']} tokens, temperature "
              f"{st['temperature']:g}, top-p {st['top_p']:g}, seed {st['seed']}):")
        print(f"  ended by themselves  {st['ended']:.0%}")
        print(f"  repeated 4-grams     {st['repeat_4gram']:.1%}")
        print(f"  distinct-2           {st['distinct_2']:.3f}")
        print(f"  mean length          {st['mean_words']:.0f} words ({st['mean_tokens']:.0f} tokens)")
        print(f"  moral present        {'n/a (no prompt had a moral)' if st['moral'] is None else format(st['moral'], '.0%')}")
        for i, ex in enumerate(st["examples"], 1):
            print(f"--- story {i}: {ex['prompt']} ---")
            print(ex["text"])


def eval_command(cfg: EvalConfig, sampling: SamplingConfig | None = None) -> None:
    report = evaluate(cfg, sampling)
    if cfg.as_json:
        json.dump(_finite(report), sys.stdout, indent=2)
        print()
    else:
        print_report(report)


def _finite(obj):
    """NaN is not JSON: an empty source's ratios become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

