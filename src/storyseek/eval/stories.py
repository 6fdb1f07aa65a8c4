"""Story checks: sample stories and measure, cheaply and reproducibly, what a reader notices first.

    ended         share of stories that end by themselves (the end token before --max-tokens)
    repeat_4gram  share of each story's word 4-grams that repeat an earlier 4-gram of the same
                  story, pooled over all stories: 0 = never loops, high = stuck in a loop
    distinct_2    distinct word bigrams / all word bigrams over every story together (Li et al.
                  2016, "distinct-2"): variety; it falls as stories get longer, so compare at equal N
    mean_words    mean story length in words (the story only: header and moral excluded)
    moral         share of stories that write a moral line, over the prompts whose data record had
                  one (None when no record had one; plain prompt files count every story)

Words are lowercase runs of letters, digits and apostrophes. Sampling goes through `generate`
(same decoding as `storyseek generate`), batch by batch with seeds derived from --seed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..data import sources
from ..data.template import MORAL, SPECIAL_PATTERN, STORY, parse_document
from ..data.tokenizer import Tokenizer
from ..errors import StoryseekError
from ..generate.config import GenerateConfig
from ..generate.text import generate
from ..model import Transformer

_WORD = re.compile(r"[a-z0-9']+")


@dataclass
class Prompt:
    text: str
    has_moral: bool | None  # whether the data record it came from had a moral; None: unknown


@dataclass
class Sample:
    prompt: Prompt
    text: str  # as `storyseek generate` prints it
    story: str  # the story part alone
    moral: str | None
    new_tokens: int
    ended: bool  # stopped by itself before the token budget


def prompts_from_documents(docs: list[str]) -> list[Prompt]:
    """The prompts of story documents (text-format documents have none)."""
    out = []
    for doc in docs:
        parts = parse_document(doc)
        if "prompt" in parts:
            out.append(Prompt(parts["prompt"], "moral" in parts))
    return out


def prompts_from_file(path: str | Path, prompt_column: str = "prompt") -> list[Prompt]:
    """A .txt file: one prompt per non-empty line. A data file (.jsonl, .json, .csv, .parquet): the
    prompt column of its records (and whether each has a moral)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise StoryseekError(f"prompt file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise StoryseekError(f"{path}: not valid UTF-8; re-encode the file as UTF-8") from None
        out = [Prompt(line.strip(), None) for line in lines if line.strip()]
    else:
        out = []
        for rec in sources.file_records(sources.expand_files([str(path)])):
            if prompt_column not in rec:
                raise StoryseekError(f"{path}: records have no '{prompt_column}' column (columns: "
                                     f"{', '.join(map(str, rec))}); name it with --prompt-column")
            if str(rec[prompt_column] or "").strip():
                out.append(Prompt(" ".join(str(rec[prompt_column]).split()), bool(rec.get("moral") or rec.get("lesson"))))
    if not out:
        raise StoryseekError(f"{path}: no prompts")
    return out


def split_story(text: str) -> tuple[str, str | None]:
    """Generated text after the prompt (`[<|character|>...]<|story|>...[<|moral|>...]`) -> (story, moral)."""
    header, marker, body = text.partition(STORY)
    body = body if marker else header
    story, marker, moral = body.partition(MORAL)
    story = SPECIAL_PATTERN.sub(" ", story).strip()
    moral = SPECIAL_PATTERN.sub(" ", moral).strip() if marker else None
    return story, moral or None


def sample_stories(model: Transformer, tokenizer: Tokenizer, prompts: list[Prompt], n: int, cfg: GenerateConfig,
                   batch_size: int = 8, progress: bool = True) -> list[Sample]:
    """n stories, the prompts taken in order (cycling when there are fewer than n)."""
    if n < 1:
        raise StoryseekError(f"--stories must be >= 1, got {n}")
    if not prompts:
        raise StoryseekError("no prompts to write stories from")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    from tqdm import tqdm

    out: list[Sample] = []
    bar = tqdm(total=n, desc="writing stories", unit=" stories", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True, leave=False)
    for b in range(0, n, batch_size):
        batch = chosen[b : b + batch_size]
        seed = None if cfg.seed is None else cfg.seed + b
        result = generate(model, tokenizer, [p.text for p in batch], replace(cfg, seed=seed, num_samples=1, raw=False))
        for p, text, ids in zip(batch, result.texts, result.token_ids):
            story, moral = split_story(tokenizer.decode(ids))
            out.append(Sample(p, text, story, moral, len(ids), len(ids) < cfg.max_tokens))
        bar.update(len(batch))
    bar.close()
    return out


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def story_checks(samples: list[Sample]) -> dict:
    """The measures above, over `samples`."""
    words = [_WORD.findall(s.story.lower()) for s in samples]
    fours = [_ngrams(w, 4) for w in words]
    n_four = sum(len(g) for g in fours)
    repeats = sum(len(g) - len(set(g)) for g in fours)
    bigrams = [b for w in words for b in _ngrams(w, 2)]
    expected = [s for s in samples if s.prompt.has_moral is not False]
    return {
        "stories": len(samples),
        "ended": sum(s.ended for s in samples) / len(samples),
        "repeat_4gram": repeats / n_four if n_four else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "mean_words": sum(len(w) for w in words) / len(samples),
        "mean_tokens": sum(s.new_tokens for s in samples) / len(samples),
        "moral": sum(s.moral is not None for s in expected) / len(expected) if expected else None,
    }
