"""Test setup: GPT-2's BPE ranks from ../shared when present, so tiktoken works offline."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"

if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))


@pytest.fixture
def shared_data() -> Path:
    """The real children's stories in ../shared/data (read-only); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real story sample not found at {SHARED_DATA}")
    return SHARED_DATA
