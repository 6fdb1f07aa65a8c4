"""The benchmark scripts the README quotes run and report what they promise (tiny sizes, seconds)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bench_generate(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate

    return bench_generate


def test_bench_generate_reports_every_path_and_what_a_speculative_step_costs(bench_generate):
    res = bench_generate.run(quick=True, repeats=1, new_tokens=6, batches=(1,), no_cache=True, hf=False,
                             train_minutes=0)
    paths = {r["path"] for r in res["rows"]}
    for dt in ("float32", "bfloat16"):
        assert {f"storyseek latent cache, {dt}", f"storyseek cache + MTP speculative (random MTP), {dt}"} <= paths
    assert "storyseek no cache (reference), float32" in paths
    assert all(r["tokens_per_s"] > 0 and 0 < r["limit_share"] for r in res["rows"])
    report = bench_generate.markdown(res)
    # one row per dtype: the speculative step's cost in plain steps, and the head that drafted (injected 2x: int8)
    cost_rows = [line for line in report.splitlines() if line.startswith("| 1 | ") and "draft head" in line]
    assert len(cost_rows) == 2 and all("int8 draft head (int8 2.0x" in line for line in cost_rows)
    assert float(cost_rows[0].split("|")[3]) > 0
