"""Test setup: GPT-2's BPE ranks from ../shared when present, so tiktoken works offline."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"

# Never the user's ~/.cache: the dtype probe's cache lives in a fresh folder (subprocesses inherit it).
os.environ["STORYSEEK_CACHE_DIR"] = tempfile.mkdtemp(prefix="storyseek-test-cache-")

if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))


@pytest.fixture
def shared_data() -> Path:
    """The real children's stories in ../shared/data (read-only); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real story sample not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine punishes spinning OpenMP
    threads; use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def cpu_probes_injected(monkeypatch):
    """The CPU probes' measurements are injected instead of depending on the host's CPU: --dtype
    auto's bf16 against fp32 (bf16 at 0.5x, so auto is float32), decoding's few-row layout and the
    int8 draft head's speed.
    tests/test_device.py varies them."""
    from storyseek import device
    from storyseek.generate import draft

    monkeypatch.setattr(device, "measure_bf16_speedup", lambda shapes, **kw: 0.5)
    # Decoding's few-row layout (model/linear.py): weight-major up to 8 rows, so every decode test runs it.
    monkeypatch.setattr(device, "measure_weight_major_rows", lambda weights: {tuple(w.shape): 8 for w in weights})
    # Speculative drafts through the int8 head copy (generate/draft.py), so every speculative test runs it.
    monkeypatch.setattr(draft, "measure_int8_speedup", lambda head, int8, **kw: 2.0)
    monkeypatch.setenv("STORYSEEK_NO_CACHE", "1")
