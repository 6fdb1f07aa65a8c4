"""One `Tokenizer` interface over GPT-2 (tiktoken) and a trained byte-level BPE (HF `tokenizers`).

Training, generation and export all go through it, and `to_dict()` is complete (a trained BPE
embeds its `tokenizer.json` text), so a checkpoint carries the exact tokenizer it was trained with.

Ids: `gpt2` keeps GPT-2's 50,257 ids (its `<|endoftext|>` = 50256 is our end token) and appends the
template's other special tokens as 50257.. (vocab_size 50,261). `bpe:N` has N ids in all; the
special tokens are ids 0..4 in `template.SPECIAL_TOKENS` order.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import StoryseekError
from .template import END, SPECIAL_PATTERN, SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.storyseek.json"  # our complete description (to_dict)
HF_TOKENIZER_FILE = "tokenizer.json"  # the trained BPE in HF `tokenizers` format, for other tools

_BPE_SPEC = re.compile(r"bpe:(\d+)")
_MAX_BPE = 1 << 20


class Tokenizer:
    """encode/decode between text and ids; the template's special tokens are single ids."""

    spec: str
    vocab_size: int  # number of ids: every id is < vocab_size
    special_ids: dict[str, int]

    @property
    def eot_id(self) -> int:
        return self.special_ids[END]

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """With allow_special=False, special-token strings are encoded as plain text."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """`encode(text)` as a uint32 array: the bulk path `prepare` uses, no Python int per token."""
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    @staticmethod
    def from_dict(d: dict) -> Tokenizer:
        spec = d.get("spec", "")
        if spec == "gpt2":
            tok: Tokenizer = GPT2Tokenizer()
        elif _BPE_SPEC.fullmatch(spec) and "tokenizer_json" in d:
            tok = BPETokenizer(d["tokenizer_json"], spec)
        else:
            raise StoryseekError(f"not a storyseek tokenizer description (spec {spec!r})")
        if d.get("special_ids", tok.special_ids) != tok.special_ids:
            raise StoryseekError(f"tokenizer {spec}: special token ids differ from this storyseek version's template")
        return tok

    def save(self, directory: str | Path) -> None:
        from .shards import write_atomic

        write_atomic(Path(directory) / TOKENIZER_FILE, json.dumps(self.to_dict()).encode())

    def __repr__(self) -> str:
        return f"Tokenizer({self.spec}, vocab_size={self.vocab_size})"


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE via tiktoken's `r50k_base` (identical ranks), plus our special tokens."""

    spec = "gpt2"

    def __init__(self, num_threads: int | None = None):
        import tiktoken

        try:
            base = tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken raises whatever its HTTP client raised
            cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
            where = f"TIKTOKEN_CACHE_DIR={cache} has no copy" if cache else "TIKTOKEN_CACHE_DIR is not set"
            raise StoryseekError(
                f"cannot load GPT-2's BPE ranks (tiktoken r50k_base: {type(e).__name__}); {where}: "
                "run once online or point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached "
                "file, or use --tokenizer bpe:N"
            ) from None
        eot = base.eot_token
        extra = [t for t in SPECIAL_TOKENS if t != END]
        self.special_ids = {END: eot, **{t: base.n_vocab + i for i, t in enumerate(extra)}}
        self._enc = tiktoken.Encoding(
            name="storyseek-gpt2",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens=self.special_ids,
        )
        self.vocab_size = self._enc.n_vocab
        self._threads = num_threads or os.cpu_count() or 1

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        if allow_special:
            return self._enc.encode_batch(texts, num_threads=self._threads, allowed_special="all")
        return self._enc.encode_ordinary_batch(texts, num_threads=self._threads)

    def encode_array(self, text: str) -> np.ndarray:
        return self._enc.encode_to_numpy(text, allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"spec": self.spec, "vocab_size": self.vocab_size, "special_ids": dict(self.special_ids)}


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained with Hugging Face `tokenizers` (lossless: any text round-trips)."""

    def __init__(self, tokenizer_json: str, spec: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self._json = tokenizer_json
        self._tok = HFTokenizer.from_str(tokenizer_json)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # The spec asked for; vocab_size can be smaller when the corpus has fewer merges to learn.
        self.spec = spec or f"bpe:{self.vocab_size}"
        self.special_ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        if None in self.special_ids.values():
            raise StoryseekError("BPE tokenizer lacks the storyseek special tokens")

    @classmethod
    def train(cls, vocab_size: int, texts: Iterable[str]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        # GPT-2's byte-level scheme: every byte is a symbol, so nothing is ever unknown, and no
        # prefix space is added, so decode(encode(x)) == x exactly.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok.to_str(), f"bpe:{vocab_size}")

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        if not allow_special:
            # Split out the special strings ourselves and encode the pieces as ordinary text.
            return [self._encode_plain(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_array(self, text: str) -> np.ndarray:
        # tokenizers slows down sharply on very long inputs, so encode document by document: the
        # end token is special, so this is exactly encode(text). The fast path skips offsets.
        docs = text.split(END)
        encodings = self._tok.encode_batch_fast(docs, add_special_tokens=False)
        eot = [self.eot_id]
        ids = itertools.chain.from_iterable(itertools.chain(e.ids, eot) for e in encodings)
        out = np.fromiter(ids, dtype=np.uint32)
        return out[:-1]  # the last piece (after the final end token, usually empty) has no end token

    def _encode_plain(self, text: str) -> list[int]:
        pieces = [p for p in SPECIAL_PATTERN.split(text) if p]
        ids: list[int] = []
        for piece, enc in zip(pieces, self._tok.encode_batch(pieces, add_special_tokens=False)):
            if piece in self.special_ids:
                # Spell the special string with byte symbols: ByteLevel maps printable ASCII to itself.
                ids.extend(self._tok.token_to_id(ch) for ch in piece)
            else:
                ids.extend(enc.ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "vocab_size": self.vocab_size,
            "special_ids": dict(self.special_ids),
            "tokenizer_json": self._json,
        }

    def save(self, directory: str | Path) -> None:
        from .shards import write_atomic

        super().save(directory)
        write_atomic(Path(directory) / HF_TOKENIZER_FILE, self._json.encode())


def parse_spec(spec: str) -> tuple[str, int]:
    """'gpt2' -> ('gpt2', 50261); 'bpe:N' -> ('bpe', N). Raises on anything else."""
    if spec == "gpt2":
        return "gpt2", 50257 + len(SPECIAL_TOKENS) - 1
    m = _BPE_SPEC.fullmatch(spec)
    if m:
        n = int(m.group(1))
        low = 256 + len(SPECIAL_TOKENS)
        if not low < n <= _MAX_BPE:
            raise StoryseekError(f"tokenizer bpe:{n}: N must be between {low + 1} and {_MAX_BPE}")
        return "bpe", n
    raise StoryseekError(f"unknown tokenizer spec {spec!r}: use 'gpt2' or 'bpe:N' (e.g. bpe:4096)")


def build_tokenizer(spec: str, training_texts: Iterable[str] | Iterator[str] | None = None) -> Tokenizer:
    """The tokenizer a spec names; `bpe:N` is trained on `training_texts`."""
    kind, n = parse_spec(spec)
    if kind == "gpt2":
        return GPT2Tokenizer()
    if training_texts is None:
        raise StoryseekError(f"tokenizer {spec} must be trained: no training texts given")
    return BPETokenizer.train(n, training_texts)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in a prepared data directory (or any folder `Tokenizer.save` wrote)."""
    path = Path(directory) / TOKENIZER_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoryseekError(f"{directory}: no {TOKENIZER_FILE}; run `storyseek prepare` first") from None
    except (OSError, ValueError) as e:
        raise StoryseekError(f"{path}: unreadable tokenizer file ({e})") from None
    return Tokenizer.from_dict(d)
