"""What `storyseek eval` scores: named lists of documents, each in the training template.

    --data DIR        the validation split of a prepared directory (decoded with DIR's tokenizer, so
                      any model can be scored on it, whatever tokenizer it was trained with)
    --files PATH...   local files, one source per file, turned into documents exactly as `prepare`
                      does (story or text format, the same columns, filters and dedup)
    --dataset NAME    a Hugging Face dataset split (streamed: only the documents scored are read)

A document is the text `prepare` writes, e.g. `<|prompt|>...<|story|>...<|endoftext|>`; the scorer
re-tokenizes it with the model's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import sources
from ..data.prepare import PrepareConfig, documents
from ..data.shards import load_meta, open_tokens
from ..data.tokenizer import load_tokenizer
from ..errors import StoryseekError


@dataclass
class Source:
    name: str
    docs: list[str]


@dataclass
class RecordFormat:
    """How records become documents (as `storyseek prepare` flags of the same names)."""

    format: str = "story"  # story | text
    prompt_column: str = "prompt"
    text_column: str = "text"
    max_docs: int | None = None  # per source

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(format=self.format, prompt_column=self.prompt_column, text_column=self.text_column,
                             max_docs=self.max_docs)


def data_dir_source(directory: str | Path, max_docs: int | None = None) -> Source:
    """The validation split of a prepared directory, split back into its documents."""
    meta = load_meta(directory)
    tokens = np.asarray(open_tokens(directory, "val"))
    tokenizer = load_tokenizer(directory)
    ends = np.flatnonzero(tokens == tokenizer.eot_id) + 1  # every document ends with the end token
    starts = np.concatenate([[0], ends[:-1]])
    if max_docs is not None:
        starts, ends = starts[:max_docs], ends[:max_docs]
    docs = [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]
    if not docs:
        raise StoryseekError(f"{directory}: the validation split holds no documents")
    return Source(f"{directory} (val, {meta.get('format', 'story')})", docs)


def file_sources(patterns: list[str], fmt: RecordFormat) -> list[Source]:
    """One source per file named (globs expanded), documents made as `prepare` makes them."""
    out = []
    for path in sources.expand_files(patterns):
        docs = list(documents(sources.file_records([path]), fmt.prepare_config()))
        if not docs:
            raise StoryseekError(f"{path}: no documents (every record was empty, too short or a duplicate)")
        out.append(Source(str(path), docs))
    return out


def dataset_source(name: str, config: str | None, split: str, fmt: RecordFormat) -> Source:
    """A Hugging Face dataset split (or a local dataset folder / packaged builder), streamed."""
    records = sources.hub_records(name, config, split, streaming=True)
    docs = list(documents(records, fmt.prepare_config()))
    if not docs:
        raise StoryseekError(f"{name} ({split}): no documents (every record was empty, too short or a duplicate)")
    return Source(f"{name}:{split}" + (f" ({config})" if config else ""), docs)
