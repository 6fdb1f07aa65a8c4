"""Text in, stories out: the prompt template, streaming text pieces, batches, and the CLI command.

    model, tok = load_model("out/best_model.pt")
    for piece in stream(model, tok, "Write a story about a brave mouse"):
        print(piece, end="", flush=True)
    result = generate(model, tok, ["a dragon who is shy", "two friends and a kite"], GenerateConfig(num_samples=2))
    result.texts  # 4 stories: prompt-major, sample-minor
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..data.template import CHARACTER, MORAL, STORY, story_prompt
from ..data.tokenizer import Tokenizer, begin_id, stop_ids
from ..device import require_compiler
from ..errors import StoryseekError
from ..memory import check_fits, generate_bytes
from ..model import Transformer
from .decode import DecodeStats, GenerateConfig, decode


class StoryseekWarning(UserWarning):
    """Something the user should know that does not stop generation (e.g. a truncated prompt)."""


@dataclass
class GenerateResult:
    texts: list[str]  # one per (prompt, sample), prompt-major
    token_ids: list[list[int]]  # the new tokens of each text
    stats: DecodeStats = field(default_factory=DecodeStats)


def encode_prompt(tokenizer: Tokenizer, prompt: str, raw: bool) -> list[int]:
    """Story mode: the training template's prefix (an empty prompt lets the model invent the story).
    Raw mode: the text as given; an empty one starts from the end token (a fresh document)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
        raise StoryseekError("the prompt is not valid UTF-8 text") from None
    if raw:
        return tokenizer.encode(prompt, allow_special=False) or [tokenizer.eot_id]
    # Stop after the prompt: the model writes the rest of the header itself, a character line
    # (`<|character|>Pip the mouse`) where its data had one, then `<|story|>` and the story.
    return tokenizer.encode(story_prompt(prompt).removesuffix(STORY))


def render(tokenizer: Tokenizer, ids: list[int], raw: bool, final: bool = True) -> str:
    """Story mode shows what follows `<|story|>` (nothing while the model is still writing the
    header, unless this is the `final` text and it never got there), the moral on its own line."""
    text = tokenizer.decode(ids)
    if raw:
        return text
    header, marker, story = text.partition(STORY)
    if not marker:
        if not final:
            return ""
        story = header
    return story.replace(CHARACTER, " ").lstrip().replace(MORAL, "\n\nMoral: ")


def _prepare(model: Transformer, tokenizer: Tokenizer, prompts: list[str], cfg: GenerateConfig) -> list[list[int]]:
    batch = len(prompts) * cfg.num_samples
    weight = model.embed.weight
    check_fits(generate_bytes(model.cfg, batch, weight.element_size()), weight.device,
               f"generating {batch:,} stories at once ({len(prompts):,} prompts x --num-samples {cfg.num_samples}, "
               f"a {model.cfg.block_size:,}-token cache each)", "lower --num-samples or give fewer prompts")
    encoded = [encode_prompt(tokenizer, p, cfg.raw) for p in prompts]
    long = sum(len(e) >= model.cfg.block_size for e in encoded)
    if long:
        warnings.warn(f"{long} prompt(s) longer than the model's context of {model.cfg.block_size} tokens: "
                      "keeping their last tokens", StoryseekWarning, stacklevel=3)
    return [e for e in encoded for _ in range(cfg.num_samples)]


class TextStream:
    """One row's text while it is decoded: `push(new_ids)` returns the text that became final
    (rendered as `render` shows it), `finish()` whatever was held back at the end.

    A piece is emitted only once its bytes form complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, raw: bool):
        self.tokenizer, self.raw = tokenizer, raw
        self.ids: list[int] = []
        self.shown = 0

    def push(self, new: list[int]) -> str:
        if not new:
            return ""
        self.ids.extend(new)
        text = render(self.tokenizer, self.ids, self.raw, final=False)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        return self._emit(text)

    def finish(self) -> str:
        return self._emit(render(self.tokenizer, self.ids, self.raw))

    def _emit(self, text: str) -> str:
        piece = text[self.shown :]
        self.shown = max(self.shown, len(text))
        return piece


def stream(model: Transformer, tokenizer: Tokenizer, prompt: str, cfg: GenerateConfig | None = None,
           stats: DecodeStats | None = None) -> Iterator[str]:
    """Yield the story as text pieces while it is decoded (first sample only; num_samples is ignored).

    `stats`, if given, is filled in as decoding goes (tokens/s, acceptance rate)."""
    cfg = cfg or GenerateConfig()
    (ids,) = _prepare(model, tokenizer, [prompt], cfg)[:1]
    text = TextStream(tokenizer, cfg.raw)
    for step in decode(model, [ids], cfg, vocab_size=tokenizer.vocab_size,
                       stop_ids=stop_ids(tokenizer, cfg.raw), begin_id=begin_id(tokenizer, cfg.raw), stats=stats):
        if piece := text.push(step[0]):
            yield piece
    if piece := text.finish():
        yield piece


def generate(model: Transformer, tokenizer: Tokenizer, prompts: list[str] | str,
             cfg: GenerateConfig | None = None) -> GenerateResult:
    """Whole stories for every prompt x cfg.num_samples, decoded together as one batch."""
    cfg = cfg or GenerateConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise StoryseekError("no prompt given")
    rows = _prepare(model, tokenizer, prompts, cfg)
    result = GenerateResult(texts=[], token_ids=[[] for _ in rows])
    for step in decode(model, rows, cfg, vocab_size=tokenizer.vocab_size,
                       stop_ids=stop_ids(tokenizer, cfg.raw), begin_id=begin_id(tokenizer, cfg.raw),
                       stats=result.stats):
        for out, new in zip(result.token_ids, step):
            out.extend(new)
    result.texts = [render(tokenizer, ids, cfg.raw) for ids in result.token_ids]
    return result


def summary(stats: DecodeStats) -> str:
    line = (f"{stats.new_tokens} tokens in {stats.total_s:.2f} s ({stats.tokens_per_s:.1f} tokens/s, "
            f"first token after {stats.first_token_s * 1000:.0f} ms)")
    if stats.compile_s:
        after = stats.new_tokens / max(stats.total_s - stats.compile_s, 1e-9)
        line += f", of which {stats.compile_s:.1f} s compiling the decode step ({after:.1f} tokens/s after it)"
    if stats.acceptance_rate is not None:
        line += f", MTP draft acceptance {stats.acceptance_rate:.0%} ({stats.accepted}/{stats.drafted}, {stats.draft})"
    if stats.auto:
        line += f"; {stats.auto}"
    return line


def generate_command(model_path: str, prompts: list[str], cfg: GenerateConfig, *, device: str = "auto",
                     dtype: str = "auto", stream_output: bool | None = None, verbose: bool = False) -> None:
    """`storyseek generate`: stories on stdout, streamed when stdout is a terminal; warnings and the
    speed / acceptance summary on stderr."""
    from .load import load_model

    def show(message, category, *args, **kwargs):
        print(f"storyseek: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        warnings.simplefilter("always", StoryseekWarning)
        model, tokenizer = load_model(model_path, device=device, dtype=dtype)
        speculative = cfg.use_speculative(model)
        if verbose:
            path = ("no cache" if not cfg.use_cache else "cache" if not speculative else "cache + MTP speculative"
                    if cfg.speculative else "cache, MTP speculative where faster (auto)")
            p = next(model.parameters())
            print(f"storyseek: {model_path}: {model.cfg.n_layer} layers x {model.cfg.n_embd}, {tokenizer!r}, "
                  f"{p.dtype} on {p.device}, {path}",
                  file=sys.stderr)
        if cfg.compile:  # else a streamed story would stall after its first token with no word why
            require_compiler(next(model.parameters()).device)  # first: no status line before its error
            print("storyseek: --compile: the first decode steps wait for torch.compile (seconds, once per process)",
                  file=sys.stderr)
        single = len(prompts) == 1 and cfg.num_samples == 1
        if stream_output is None:
            stream_output = sys.stdout.isatty()
        if stream_output and single:
            stats = DecodeStats()
            for piece in stream(model, tokenizer, prompts[0], cfg, stats=stats):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            result = generate(model, tokenizer, prompts, cfg)
            stats = result.stats
            for i, text in enumerate(result.texts):
                if not single:
                    p, s = divmod(i, cfg.num_samples)
                    print(f"--- prompt {p + 1}, sample {s + 1} ---" if len(prompts) > 1 else f"--- sample {s + 1} ---")
                print(text)
        sys.stdout.flush()
        if verbose or speculative or cfg.compile:
            print(f"storyseek: {summary(stats)}", file=sys.stderr)
