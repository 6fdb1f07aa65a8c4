"""Atomic writes: a file (or a directory) appears whole under its name, or not at all.

Every file storyseek writes for the user (shards' meta.json, checkpoints, the metrics CSV and plot,
exported models) goes through here: it is written under a temporary name in the same directory,
flushed to disk (fsync), then renamed over the target. `os.replace` within one file system is atomic,
so a crash, Ctrl-C or full disk at any moment leaves either the old file or the new one, never a torn
one that a later `--resume` or `load_meta` would trust.

    with atomic_write(path) as f:          # binary; atomic_write(path, "w", newline="") for text
        torch.save(state, f)
    write_atomic(path, json_text)          # str or bytes in one call

Temporary files are opened with the user's umask (not mkstemp's 0600), so what lands is readable as
any file the user creates.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _temp_name(path: Path, suffix: str = ".tmp") -> Path:
    # Hidden, unique per writer (two ranks or two runs never share one), recognisable as ours.
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; when the block ends normally, fsync it and rename it over
    `path`. On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is
    untouched. The parent directory is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """`data` to `path` atomically (text as UTF-8)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_write(path) as f:
        f.write(data)


def fsync_path(path: str | Path) -> None:
    """Flush a file another library wrote (safetensors, matplotlib) to disk, and give it the
    permissions the user's umask implies (some writers create files 0600)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then put it at `out` in one rename. An existing `out`
    is moved aside first and deleted only once the new one is in place; on failure `out` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    tmp.mkdir()  # not mkdtemp: the result gets the user's usual permissions, not 0700
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
