"""The prepared data directory on disk: token shards, meta.json, and the readers training uses.

Layout of OUT::

    train.bin, val.bin         flat token streams (uint16, or uint32 when vocab_size > 65536),
                               documents back to back, each ending with the end-of-text id
    meta.json                  what was prepared and how (written last: its presence means complete)
    tokenizer.storyseek.json   the tokenizer (`load_tokenizer(OUT)`); bpe also has tokenizer.json

A preparation is built in OUT/.staging-<pid>/ and moved into place only when complete, meta.json
last, so an interrupted run never leaves shards that `load_meta` would accept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import StoryseekError
from ..files import write_atomic

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
_STAGING = ".staging-"
_OUR_FILES = ("train.bin", "val.bin", "tokenizer.json", "tokenizer.storyseek.json")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------------------- readers


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a complete preparation; a clear error for anything else."""
    d = Path(data_dir)
    path = d / META_FILE
    if not d.is_dir():
        raise StoryseekError(f"data directory not found: {d} (create it with `storyseek prepare --out {d}`)")
    if not path.is_file():
        raise StoryseekError(f"{d} is not a prepared data directory (no {META_FILE}); run `storyseek prepare --out {d}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoryseekError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise StoryseekError(
            f"{path}: data format version {found!r}, this storyseek reads {FORMAT_VERSION}; prepare again with --force"
        )
    return meta


def open_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The token stream of one split ('train' or 'val'), memory-mapped read-only."""
    if split not in SPLITS:
        raise StoryseekError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    info = meta["splits"][split]
    path = Path(data_dir) / info["file"]
    dtype = np.dtype(meta["dtype"])
    expected = info["tokens"] * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise StoryseekError(f"{path}: missing or truncated ({expected} bytes expected); prepare again with --force")
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------------------- writing


def reusable(out: Path, args: dict, force: bool) -> dict | None:
    """The meta of an identical, complete preparation in `out` (None: build it).

    Refuses an `out` that holds a different preparation (unless `force`) or files that are not ours.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise StoryseekError(f"--out {out} is a file, not a directory")
    if not (out / META_FILE).is_file():
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(_STAGING)]
        if foreign:
            raise StoryseekError(
                f"--out {out} is not empty and holds no storyseek preparation ({foreign[0]}, ...); choose another --out"
            )
        return None
    try:
        meta = load_meta(out)
    except StoryseekError:
        if force:
            return None
        raise
    if force:
        return None
    if meta.get("args") != args:
        old = meta.get("args", {})
        diff = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
        raise StoryseekError(
            f"--out {out} holds a different preparation (differs in: {', '.join(diff)}); "
            "use --force to replace it, or another --out"
        )
    try:
        for split in SPLITS:
            open_tokens(out, split)
    except StoryseekError:
        return None  # damaged: rebuild
    return meta


class Staging:
    """A build directory inside `out`, committed into `out` in one step or removed on failure."""

    def __init__(self, out: Path):
        self.out = out
        self._created_out = not out.exists()
        self.dir = out / f"{_STAGING}{os.getpid()}"

    def __enter__(self) -> Staging:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(_STAGING + "*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self.dir.mkdir()
        return self

    def commit(self, meta: dict) -> None:
        """Move the built files into `out`; meta.json goes last, so until then `out` is incomplete."""
        (self.out / META_FILE).unlink(missing_ok=True)
        built = {f.name for f in self.dir.iterdir()}
        for name in set(_OUR_FILES) - built:  # e.g. a bpe tokenizer.json left by the preparation replaced
            (self.out / name).unlink(missing_ok=True)
        for f in sorted(self.dir.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(f, self.out / f.name)
        write_atomic(self.out / META_FILE, json.dumps(meta, indent=2) + "\n")
        self.dir.rmdir()

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if exc_type is not None and self._created_out:
            shutil.rmtree(self.out, ignore_errors=True)


class TokenWriter:
    """Appends token arrays to one split's file in the staging directory."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = dtype
        self.tokens = 0
        self.documents = 0
        self._f = open(path, "wb")

    def write(self, ids: np.ndarray, documents: int) -> None:
        self._f.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(ids)
        self.documents += documents

    def close(self) -> None:
        self._f.close()
