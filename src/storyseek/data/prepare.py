"""`storyseek prepare`: records -> documents -> token shards, streaming and in bounded memory.

The main thread reads records, normalises and formats them (template.py), drops empty, too short,
too long and duplicate documents, and assigns each document to train or val by a hash of its text
(so the split is deterministic and a document keeps its split when more data is added). Documents
are grouped into blocks of ~64K characters; `num_proc` threads tokenize blocks in parallel (tiktoken
and `tokenizers` release the GIL, so threads use every core without pickling anything), and blocks
are written in order, so the output is identical whatever `num_proc` is.

Because every document ends with the end-of-text special token, encoding a block equals encoding
its documents one by one. `bpe:N` must be trained before anything is encoded, so its documents are
first spooled to the staging directory, the tokenizer learns from the training split (up to
`BPE_TRAIN_CHARS` of it), and the spool is then tokenized.

Memory: one block per thread in flight, plus the dedup set (an int per kept document, ~70 bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import StoryseekError
from ..settings import setting
from . import sources
from .shards import FORMAT_VERSION, SPLITS, Staging, TokenWriter, reusable, token_dtype
from .template import END, SPECIAL_PATTERN, SPECIAL_TOKENS, normalize_line, normalize_text, story_document, text_document
from .tokenizer import BPETokenizer, GPT2Tokenizer, Tokenizer, parse_spec

BUILTIN_DOCS = 20_000  # stories `--dataset builtin` generates when --max-docs is not given
_OUTPUT = "tokenizer and output"
BLOCK_CHARS = 1 << 16
BPE_TRAIN_CHARS = 10_000_000  # ~10 MB of text: plenty for merges of small vocabularies; training time is linear in it


@dataclass
class PrepareConfig:
    """Everything that decides what `prepare` writes (plus where, and how many threads)."""

    # source
    dataset: str | None = setting(None, "Hugging Face dataset name, or 'builtin' for the offline story generator",
                                  default_text=sources.DEFAULT_DATASET, group="source")
    config: str | None = setting(None, "dataset configuration (subset) on the Hub", group="source")
    split: str = setting("train", "Hub split to read (our train/val split is made by hash)", group="source")
    streaming: bool = setting(False, "stream from the Hub instead of downloading the dataset first", group="source")
    data_files: tuple[str, ...] = setting((), "local .jsonl/.json/.csv/.parquet/.txt files or globs (instead of "
                                              "--dataset)", metavar="PATH", default_text="", group="source")
    preset: str | None = setting(None, "fineweb-edu: HuggingFaceFW/fineweb-edu sample-10BT, streamed, text format, "
                                       "English, score >= 3, 100-3000 chars, 80/20 split",
                                 choices=("fineweb-edu",), group="source")
    max_docs: int | None = setting(None, "stop after N kept documents", group="source",
                                   default_text=f"all; builtin: {BUILTIN_DOCS} stories")
    max_files: int | None = setting(None, "read only the first N data files", group="source")
    seed: int = setting(0, "builtin generator seed", group="source")
    # records
    format: str = setting("story", "story: prompt/character/story/moral template; text: plain text continuation",
                          choices=("story", "text"), group="records")
    prompt_column: str = setting("prompt", "column holding the prompt (story format; a row without one is a "
                                           "story with an empty prompt)", group="records")
    text_column: str = setting("text", "column holding the story/text", group="records")
    min_score: float | None = setting(None, "keep rows whose 'score' column is >= this", group="records")
    language: str | None = None  # keep rows whose `language` column equals this (the fineweb-edu preset)
    min_chars: int = setting(32, "drop texts shorter than this", group="records")
    max_chars: int | None = setting(None, "drop texts longer than this", group="records")
    lowercase: bool = setting(False, "lowercase everything (default: keep case)", group="records")
    val_fraction: float = setting(0.05, "share of documents for validation", group="records")
    # tokenizer and output
    tokenizer: str = setting("gpt2", "gpt2, or bpe:N: a byte-level BPE of N tokens trained on the data", group=_OUTPUT)
    num_proc: int | None = setting(None, "tokenizer threads", default_text="all cores", group=_OUTPUT)
    out: str | None = setting(None, "output directory", default_text="data/<dataset>-<tokenizer>", group=_OUTPUT)
    force: bool = setting(False, "rebuild even if OUT holds a preparation", group=_OUTPUT)

    def __post_init__(self) -> None:
        self.data_files = tuple(self.data_files)  # the command line gives a list

    @classmethod
    def from_preset(cls, preset: str | None, **overrides) -> PrepareConfig:
        """The preset's values, then `overrides` (e.g. the flags a user gave explicitly)."""
        if preset is None:
            return cls(**overrides)
        if preset not in PRESETS:
            raise StoryseekError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], "preset": preset, **overrides})


PRESETS: dict[str, dict] = {
    # FineWeb-edu as a text-continuation corpus. score >= 3.0 is a little stricter than the
    # dataset's own cut (int_score >= 3, i.e. score >= 2.5): it drops the borderline pages.
    "fineweb-edu": dict(
        dataset=sources.FINEWEB_EDU,
        config="sample-10BT",
        streaming=True,
        format="text",
        min_score=3.0,
        language="en",
        min_chars=100,
        max_chars=3000,
        val_fraction=0.2,
    ),
}


def _validate(cfg: PrepareConfig) -> None:
    if cfg.format not in ("story", "text"):
        raise StoryseekError(f"unknown format {cfg.format!r}: use story or text")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise StoryseekError(f"--val-fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}")
    for name in ("max_docs", "max_files", "num_proc"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise StoryseekError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.min_chars < 0 or (cfg.max_chars is not None and cfg.max_chars < max(cfg.min_chars, 1)):
        raise StoryseekError("--min-chars must be >= 0 and --max-chars >= --min-chars")
    if cfg.data_files and cfg.dataset == sources.BUILTIN:
        raise StoryseekError("choose one source: --dataset builtin or --data-files")
    parse_spec(cfg.tokenizer)


def default_out(cfg: PrepareConfig) -> Path:
    if cfg.data_files:
        name = Path(cfg.data_files[0]).stem.replace("*", "") or "files"
    else:
        name = (cfg.preset or cfg.dataset or sources.DEFAULT_DATASET).split("/")[-1].lower()
    return Path("data") / f"{name}-{cfg.tokenizer.replace(':', '')}"


def _open_source(cfg: PrepareConfig) -> tuple[Iterator[dict], dict]:
    """(records, description for meta.json); file problems are reported before anything is written."""
    if cfg.data_files:
        paths = sources.expand_files(cfg.data_files, cfg.max_files)
        desc = {"kind": "files", "files": sources.files_fingerprint(paths)}
        return sources.file_records(paths), desc
    if cfg.dataset == sources.BUILTIN:
        desc = {"kind": "builtin", "seed": cfg.seed, "stories": cfg.max_docs}
        return sources.builtin_records(cfg.max_docs, cfg.seed), desc
    name = cfg.dataset or sources.DEFAULT_DATASET
    desc = {"kind": "hub", "dataset": name, "config": cfg.config, "split": cfg.split, "max_files": cfg.max_files}
    return None, desc  # opened (network) only once we know the output must be built


class _Counts:
    def __init__(self):
        self.read = 0
        self.dropped: Counter[str] = Counter()
        self.docs = [0, 0]  # kept documents per split
        self.without_prompt = 0  # stories kept with an empty prompt (their record had none)


def _check_columns(rec: dict, cfg: PrepareConfig) -> None:
    """The first record must have the columns every record needs. Not the prompt: a story without
    one (TinyStories rows have only `text`) is kept with an empty prompt, so folders may mix both."""
    needed = [cfg.text_column] + ["score"] * (cfg.min_score is not None) + ["language"] * (cfg.language is not None)
    for col in needed:
        if col not in rec:
            hint = "; map another column with --text-column" if col == cfg.text_column else ""
            raise StoryseekError(f"the data has no '{col}' column (columns: {', '.join(map(str, rec))}){hint}")


def _documents(records: Iterator[dict], cfg: PrepareConfig, counts: _Counts) -> Iterator[tuple[int, str]]:
    """(split, document) for every record kept: 0 = train, 1 = val."""
    val_below = int(cfg.val_fraction * 2**64)
    seen: set[int] = set()
    story = cfg.format == "story"
    lower = cfg.lowercase
    dropped = counts.dropped
    for rec in records:
        if counts.read == 0:
            _check_columns(rec, cfg)
        counts.read += 1
        if cfg.language is not None and rec.get("language") != cfg.language:
            dropped["wrong_language"] += 1
            continue
        if cfg.min_score is not None and not (rec.get("score") or 0) >= cfg.min_score:
            dropped["low_score"] += 1
            continue
        text = rec.get(cfg.text_column)
        text = normalize_text(text if isinstance(text, str) else str(text or ""), lower)
        if not text:
            dropped["empty_text"] += 1
            continue
        if len(text) < cfg.min_chars:
            dropped["too_short"] += 1
            continue
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            dropped["too_long"] += 1
            continue
        if story:
            # No prompt: the story still trains the model, under an empty prompt, which is also
            # how `generate` asks for a story about anything.
            prompt = normalize_line(str(rec.get(cfg.prompt_column) or ""), lower)
            moral = rec.get("moral") or rec.get("lesson")
            character = rec.get("character")
            doc = story_document(prompt, text, moral and str(moral), character and str(character), lower)
        else:
            doc = text_document(text)
        h = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little")
        if h in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(h)
        counts.without_prompt += story and not prompt
        split = int(h < val_below)
        counts.docs[split] += 1
        yield split, doc
        if cfg.max_docs is not None and counts.docs[0] + counts.docs[1] >= cfg.max_docs:
            return


def documents(records: Iterator[dict], cfg: PrepareConfig) -> Iterator[str]:
    """The documents `prepare` makes of `records` (filters, template, dedup), of both splits."""
    return (doc for _, doc in _documents(records, cfg, _Counts()))


def _blocks(docs: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str, int]]:
    """(split, block text, documents in it): documents of one split, ~BLOCK_CHARS at a time."""
    parts: list[list[str]] = [[], []]
    size = [0, 0]
    for split, doc in docs:
        parts[split].append(doc)
        size[split] += len(doc)
        if size[split] >= BLOCK_CHARS:
            yield split, "".join(parts[split]), len(parts[split])
            parts[split], size[split] = [], 0
    for split in (0, 1):
        if parts[split]:
            yield split, "".join(parts[split]), len(parts[split])


def _spool(blocks: Iterator[tuple[int, str, int]], directory: Path) -> list[Path]:
    """Write each split's documents back to back (UTF-8) so they can be read twice."""
    paths = [directory / f"{s}.docs" for s in SPLITS]
    files = [open(p, "w", encoding="utf-8", newline="") for p in paths]
    try:
        for split, text, _ in blocks:
            files[split].write(text)
    finally:
        for f in files:
            f.close()
    return paths


def _read_spool(path: Path) -> Iterator[str]:
    """Blocks of whole documents from a spool file (cut after an end token)."""
    rest = ""
    with open(path, encoding="utf-8", newline="") as f:
        while chunk := f.read(BLOCK_CHARS):
            chunk = rest + chunk
            cut = chunk.rfind(END) + len(END)
            if cut < len(END):
                rest = chunk
                continue
            rest = chunk[cut:]
            yield chunk[:cut]
    if rest:
        yield rest


def _spooled_blocks(paths: list[Path]) -> Iterator[tuple[int, str, int]]:
    for split, path in enumerate(paths):
        for block in _read_spool(path):
            yield split, block, block.count(END)


def _bpe_training_texts(path: Path) -> Iterator[str]:
    """Training-split text for the BPE trainer, special tokens cut out, up to BPE_TRAIN_CHARS."""
    total = 0
    for block in _read_spool(path):
        for piece in SPECIAL_PATTERN.split(block):
            if piece and piece not in SPECIAL_TOKENS:
                yield piece
        total += len(block)
        if total >= BPE_TRAIN_CHARS:
            return


class _Progress:
    """tqdm bar counting documents (docs/s) with tokens/s alongside; silent when not a terminal."""

    def __init__(self, desc: str, total: int | None):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, total=total, unit=" docs", disable=None, file=sys.stderr, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.tokens = 0

    def update(self, docs: int, tokens: int = 0) -> None:
        self.tokens += tokens
        self.bar.update(docs)
        if tokens:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _counted(blocks: Iterator[tuple[int, str, int]], progress: _Progress) -> Iterator[tuple[int, str, int]]:
    for block in blocks:
        progress.update(block[2])
        yield block


def _tokenize(blocks, tok: Tokenizer, writers: list[TokenWriter], threads: int, progress: _Progress) -> None:
    """Encode blocks on `threads` threads, writing results in input order."""
    pending: deque = deque()

    def drain_one() -> None:
        split, ndocs, future = pending.popleft()
        ids = future.result()
        writers[split].write(ids, ndocs)
        progress.update(ndocs, len(ids))

    dtype = writers[0].dtype

    def encode(text: str):
        return tok.encode_array(text).astype(dtype, copy=False)

    with ThreadPoolExecutor(threads) as pool:
        for split, text, ndocs in blocks:
            pending.append((split, ndocs, pool.submit(encode, text)))
            if len(pending) >= 2 * threads:
                drain_one()
        while pending:
            drain_one()


def _fingerprint(cfg: PrepareConfig, source: dict) -> dict:
    """The arguments that determine the output; a different fingerprint means a different dataset."""
    args = dataclasses.asdict(cfg)
    for k in ("num_proc", "out", "force", "streaming", "data_files"):  # streaming: same rows either way
        args.pop(k)
    if source["kind"] == "files":
        args["files"] = source["files"]  # resolved paths with size and mtime: edited files rebuild
    return args


def prepare(cfg: PrepareConfig) -> Path:
    """Build (or reuse) the prepared data directory for `cfg`; returns its path."""
    _validate(cfg)
    if cfg.dataset == sources.BUILTIN and cfg.max_docs is None:
        cfg = dataclasses.replace(cfg, max_docs=BUILTIN_DOCS)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    records, source = _open_source(cfg)
    args = _fingerprint(cfg, source)
    if reusable(out, args, cfg.force) is not None:
        print(f"reusing {out} (prepared with the same arguments; --force rebuilds it)")
        return out
    kind, _ = parse_spec(cfg.tokenizer)
    threads = cfg.num_proc or os.cpu_count() or 1
    started = time.perf_counter()
    counts = _Counts()
    with Staging(out) as stage:
        if records is None:
            records = sources.hub_records(
                source["dataset"], cfg.config, cfg.split, cfg.streaming, max_files=cfg.max_files
            )
        blocks = _blocks(_documents(records, cfg, counts))
        if kind == "gpt2":
            tok: Tokenizer = GPT2Tokenizer(threads)
        else:
            reading = _Progress("reading", cfg.max_docs)
            spool = _spool(_counted(blocks, reading), stage.dir)
            reading.close()
            _check_nonempty(counts, cfg)
            print(f"training {cfg.tokenizer} tokenizer on the training split", file=sys.stderr)
            tok = BPETokenizer.train(parse_spec(cfg.tokenizer)[1], _bpe_training_texts(spool[0]))
            blocks = _spooled_blocks(spool)
        dtype = token_dtype(tok.vocab_size)
        writers = [TokenWriter(stage.dir / f"{s}.bin", dtype) for s in SPLITS]
        progress = _Progress("tokenizing", sum(counts.docs) if kind != "gpt2" else cfg.max_docs)
        try:
            _tokenize(blocks, tok, writers, threads, progress)
        finally:
            progress.close()
            for w in writers:
                w.close()
        if kind != "gpt2":
            for p in spool:
                p.unlink()
        _check_nonempty(counts, cfg)
        tok.save(stage.dir)
        seconds = time.perf_counter() - started
        tokens = sum(w.tokens for w in writers)
        meta = {
            "format_version": FORMAT_VERSION,
            "storyseek_version": __version__,
            "source": source,
            "format": cfg.format,
            "filters": {
                "lowercase": cfg.lowercase,
                "min_chars": cfg.min_chars,
                "max_chars": cfg.max_chars,
                "min_score": cfg.min_score,
                "language": cfg.language,
                "dedup": "exact (normalised document)",
                "max_docs": cfg.max_docs,
            },
            "val_fraction": cfg.val_fraction,
            "tokenizer": {
                "spec": tok.spec,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "special_ids": tok.special_ids,
                "file": "tokenizer.storyseek.json",
            },
            "dtype": dtype.name,
            "splits": {s: {"file": f"{s}.bin", "documents": w.documents, "tokens": w.tokens} for s, w in zip(SPLITS, writers)},
            "records_read": counts.read,
            "stories_without_prompt": counts.without_prompt,
            "dropped": dict(sorted(counts.dropped.items())),
            "seconds": round(seconds, 2),
            "args": args,
        }
        stage.commit(meta)
    docs = writers[0].documents + writers[1].documents
    no_prompt = (f"{counts.without_prompt:,} of them stories without a '{cfg.prompt_column}' (kept, empty prompt); "
                 if counts.without_prompt else "")
    print(
        f"prepared {out}: {counts.read:,} records read; kept: train {writers[0].documents:,} docs / "
        f"{writers[0].tokens:,} tokens, val {writers[1].documents:,} docs / {writers[1].tokens:,} tokens "
        f"({tok.spec}, {dtype.name}); {no_prompt}dropped: {_reasons(counts)}; "
        f"{docs / seconds:,.0f} docs/s, {tokens / seconds / 1e6:.2f}M tokens/s"
    )
    return out


def _check_nonempty(counts: _Counts, cfg: PrepareConfig) -> None:
    if counts.read == 0:
        raise StoryseekError("the dataset is empty: no records were read")
    if counts.docs[0] == 0:
        raise StoryseekError(f"no training documents: all {counts.read} records were dropped ({_reasons(counts)})")
    if counts.docs[1] == 0:
        raise StoryseekError(
            f"the validation split is empty ({counts.docs[0]} documents, --val-fraction {cfg.val_fraction}); "
            "add data or raise --val-fraction"
        )


def _reasons(counts: _Counts) -> str:
    """Why records were dropped, as counted: 'duplicate 3, empty_text 1' (or 'none')."""
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.dropped.items())) or "none"
