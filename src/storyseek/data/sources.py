"""Where records come from: the Hugging Face Hub, local files, or the builtin story generator.

Every source is an iterator of plain dicts (one per record), read lazily so memory stays bounded.
Bad input is reported as one `StoryseekError` line naming the file and line.

FineWeb-edu (`HuggingFaceFW/fineweb-edu`) columns the preset filters on:
  `score`     the FineWeb-Edu classifier's educational-quality rating of the page, a float from 0
              (no educational value) to 5 (highly educational, like a textbook). The classifier is a
              regression head on a BERT-like encoder trained on Llama-3-70B annotations.
  `int_score` that score rounded to an integer. The dataset itself only keeps int_score >= 3
              (score >= 2.5); `fineweb-edu-score-2` keeps int_score >= 2.
  `language`  the detected language ("en" throughout fineweb-edu, checked anyway).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from ..errors import StoryseekError

DEFAULT_DATASET = "ajibawa-2023/Children-Stories-Collection"
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
BUILTIN = "builtin"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
OFFLINE_HINT = "offline options: --dataset builtin, or --data-files PATH (.jsonl/.json/.csv/.parquet/.txt)"

# Rows are consumed in batches: one Arrow batch -> plain dicts keeps per-row overhead low.
_BATCH = 1024


# ----------------------------------------------------------------------------------------- files


def expand_files(patterns: list[str] | tuple[str, ...], max_files: int | None = None) -> list[Path]:
    """Paths and globs -> existing files, in the given order (each glob sorted), first `max_files`."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise StoryseekError(f"no files match {pattern}")
            paths.extend(Path(p) for p in matches)
        elif os.path.isfile(pattern):
            paths.append(Path(pattern))
        elif os.path.isdir(pattern):
            raise StoryseekError(f"{pattern} is a directory: pass files or a glob such as {pattern}/*.jsonl")
        else:
            raise StoryseekError(f"file not found: {pattern}")
    for p in paths:
        if p.suffix.lower() not in FILE_SUFFIXES:
            raise StoryseekError(f"{p}: unsupported file type {p.suffix or '(none)'}; use one of {', '.join(FILE_SUFFIXES)}")
    return paths[:max_files] if max_files else paths


def file_records(paths: list[Path]) -> Iterator[dict]:
    """Records of local files, one reader per suffix; each reader streams its file."""
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet, ".txt": _txt}
    for path in paths:
        yield from readers[path.suffix.lower()](path)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) with strict UTF-8, naming the line of a bad byte."""
    try:
        with open(path, encoding="utf-8", newline="") as f:  # decoded in large chunks, at C speed
            yield from enumerate(f, 1)
    except UnicodeDecodeError:
        _raise_bad_utf8(path)


def _raise_bad_utf8(path: Path) -> None:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StoryseekError(
                    f"{path}: line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "re-encode the file as UTF-8"
                ) from None
    raise StoryseekError(f"{path}: not valid UTF-8; re-encode the file as UTF-8")


def _jsonl(path: Path) -> Iterator[dict]:
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoryseekError(f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise StoryseekError(f"{path}: line {n} is a JSON {type(rec).__name__}, expected an object")
        yield rec


def _json(path: Path) -> Iterator[dict]:
    """A JSON array of objects, or an object holding one such array (e.g. {"data": [...]}).

    Read whole (JSON has no record boundaries): use .jsonl for large data.
    """
    text = "".join(line for _, line in _lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: it is JSON Lines named .json
            yield from _jsonl(path)
            return
        raise StoryseekError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise StoryseekError(f"{path}: expected a JSON array of objects, or an object holding one array")
        data = lists[0]
    if not isinstance(data, list):
        raise StoryseekError(f"{path}: expected a JSON array of objects, got a {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise StoryseekError(f"{path}: item {i} is a JSON {type(rec).__name__}, expected an object")
        yield rec


def _csv(path: Path) -> Iterator[dict]:
    # Stories are longer than csv's default 128 KiB field limit.
    csv.field_size_limit(1 << 30)
    lines = (line for _, line in _lines(path))
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    for row in reader:
        if len(row) != len(header):
            if not row:  # a blank line
                continue
            raise StoryseekError(
                f"{path}: row ending at line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
            )
        yield dict(zip(header, row))


def _parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=_BATCH):
            yield from batch.to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StoryseekError(f"{path}: unreadable Parquet file ({str(e).splitlines()[0]})") from None


def _txt(path: Path) -> Iterator[dict]:
    """One record per blank-line-separated block: {"text": block}."""
    block: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield {"text": "".join(block)}
            block = []
    if block:
        yield {"text": "".join(block)}


def files_fingerprint(paths: list[Path]) -> list[list]:
    """What identifies the input files' content for reuse checks: path, size, modification time."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


# ------------------------------------------------------------------------------------------- hub


def _check_hub_reachable(name: str) -> None:
    """Fail in a second, not after datasets' minute of retries, when the Hub cannot be reached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        raise StoryseekError(
            f"cannot reach the Hugging Face Hub ({url.hostname}) to load {name}; {OFFLINE_HINT} "
            "(or HF_HUB_OFFLINE=1 to use a copy already in the datasets cache)"
        ) from None


def hub_records(
    name: str,
    config: str | None = None,
    split: str = "train",
    streaming: bool = False,
    data_files: str | list[str] | None = None,
    max_files: int | None = None,
) -> Iterator[dict]:
    """Rows of `datasets.load_dataset(name, config, split=...)`; loads now, yields lazily.

    `name` may also be a packaged builder ("json", "parquet", ...) with `data_files`.
    `max_files` keeps only the first N data files of the split (a slice of a huge corpus).
    """
    import datasets

    local = name in datasets.packaged_modules._PACKAGED_DATASETS_MODULES or os.path.exists(name)
    if not local:
        _check_hub_reachable(name)
    try:
        if max_files:
            builder = datasets.load_dataset_builder(name, config, data_files=data_files)
            files = builder.config.data_files
            if not files or split not in files:
                raise StoryseekError(f"--max-files: {name} does not list data files for split {split!r}")
            # The files are resolved (full paths/URLs) already: load them without the config.
            data_files, config = {split: list(files[split])[:max_files]}, None
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming, data_files=data_files)
    except StoryseekError:
        raise
    except ConnectionError:
        raise StoryseekError(f"cannot reach the Hugging Face Hub to load {name}; {OFFLINE_HINT}") from None
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ValueError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoryseekError(f"cannot load dataset {name}: {msg}") from None
    return _rows(ds, name)


def _rows(ds, name: str) -> Iterator[dict]:
    try:
        for batch in ds.iter(batch_size=_BATCH):
            keys = list(batch)
            for values in zip(*batch.values()):
                yield dict(zip(keys, values))
    except ConnectionError:
        raise StoryseekError(f"lost the connection to the Hugging Face Hub while reading {name}") from None


# --------------------------------------------------------------------------------------- builtin


def builtin_records(n: int, seed: int = 0) -> Iterator[dict]:
    """`n` distinct procedural children's stories (prompt, text, moral, character), no network."""
    from .builtin import iter_stories

    return iter_stories(n, seed=seed)
