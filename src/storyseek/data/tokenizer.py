"""One `Tokenizer` interface over GPT-2 (tiktoken) and a trained byte-level BPE (HF `tokenizers`).

Training, generation and export all go through it, and `to_dict()` is complete (a trained BPE
embeds its `tokenizer.json` text), so a checkpoint carries the exact tokenizer it was trained with.

Ids: `gpt2` keeps GPT-2's 50,257 ids (its `<|endoftext|>` = 50256 is our end token) and appends the
template's other special tokens as 50257.. (vocab_size 50,261). `bpe:N` has N ids in all; the
special tokens are ids 0..4 in `template.SPECIAL_TOKENS` order.

Also here: where generation stops (`stop_ids`), and the tokenizer as a Hugging Face `tokenizer.json`
(`hf_tokenizer_json`) that gives exactly our ids, which export writes and `transformers` reads.
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
from ..files import write_atomic
from .template import END, PROMPT, SPECIAL_PATTERN, SPECIAL_TOKENS, STORY

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

    def token_bytes(self) -> np.ndarray:
        """[vocab_size] int64: the UTF-8 bytes of text each id stands for; 0 for the special tokens.

        Byte-level BPE is lossless, so the entries of a text's ids sum to len(text.encode()) once its
        special tokens are removed: the denominator of bits per byte."""
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
        write_atomic(Path(directory) / TOKENIZER_FILE, json.dumps(self.to_dict()))

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

    def token_bytes(self) -> np.ndarray:
        special = set(self.special_ids.values())
        return np.array([0 if i in special else len(self._enc.decode_single_token_bytes(i))
                         for i in range(self.vocab_size)], dtype=np.int64)

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

    def token_bytes(self) -> np.ndarray:
        # Byte-level BPE spells every byte as one printable character: a token's length in
        # characters is its length in bytes.
        special = set(self.special_ids.values())
        return np.array([0 if i in special else len(self._tok.id_to_token(i))
                         for i in range(self.vocab_size)], dtype=np.int64)

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "vocab_size": self.vocab_size,
            "special_ids": dict(self.special_ids),
            "tokenizer_json": self._json,
        }

    def save(self, directory: str | Path) -> None:
        super().save(directory)
        write_atomic(Path(directory) / HF_TOKENIZER_FILE, self._json)


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


def stop_ids(tokenizer: Tokenizer, raw: bool) -> set[int]:
    """Where generation stops: the end of the document; in story mode (`raw` False) also the marker
    that would begin a new one (`<|prompt|>`), as a model trained on the template may write it."""
    names = (END,) if raw else (END, PROMPT)
    return {tokenizer.special_ids[n] for n in names if n in tokenizer.special_ids}


def begin_id(tokenizer: Tokenizer, raw: bool) -> int | None:
    """Where a text's min_tokens start counting: in story mode the `<|story|>` marker that the model
    writes after the rest of the header (before it, up to config.HEADER_TOKENS, a row may not end: a
    header is no story); raw text from its first new token (None)."""
    return None if raw else tokenizer.special_ids.get(STORY)


# ------------------------------------------------------------------ Hugging Face `tokenizers` JSON
def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """A `tokenizers` JSON that gives exactly our ids: the trained BPE already is one; GPT-2 is
    rebuilt from tiktoken's ranks, as transformers' TikTokenConverter does, with our special tokens."""
    if tokenizer.spec != "gpt2":
        return tokenizer.to_dict()["tokenizer_json"]
    import tiktoken
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    enc = tiktoken.get_encoding("r50k_base")  # already loaded (and checked) by our GPT2Tokenizer
    ranks = enc._mergeable_ranks
    char = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(char[x] for x in b)

    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; a BPE merge list
    # ordered by the rank of the merged token reproduces that. ignore_merges: a pre-token that is
    # itself in the vocabulary is taken whole, as tiktoken does.
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort()
    bpe = models.BPE({text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for *_, a, b in merges],
                     fuse_unk=False, ignore_merges=True)
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in specials])
    wrong = [t for t, i in specials if tok.token_to_id(t) != i]
    if wrong:
        raise StoryseekError(f"cannot give {wrong[0]} its id {tokenizer.special_ids[wrong[0]]} in tokenizer.json")
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE works on these characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
