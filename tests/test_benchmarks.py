"""The benchmark scripts the README quotes run and report what they promise (tiny sizes, seconds)."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def benchmarks(monkeypatch):
    """The benchmarks folder on sys.path: its scripts import each other by name."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_bench_generate_reports_every_path_and_what_a_speculative_step_costs(benchmarks):
    import bench_generate

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


def test_bench_train_reports_transformers_and_storyseek_rows(benchmarks):
    import bench_train

    res = bench_train.run(quick=True, batch=2, seq=32, rounds=1, steps=1, device_name="cpu", compile_=False)
    variants = {r["variant"] for r in res["rows"]}
    assert {"transformers DeepseekV3 fp32", "storyseek fp32"} <= variants
    assert all(r["tokens_per_sec"] > 0 for r in res["rows"])
    assert "storyseek fp32" in bench_train.markdown(res)


def test_bench_export_decodes_the_export_in_both_engines(benchmarks):
    import bench_export

    res = bench_export.run(quick=True, new_tokens=4)
    assert {(r["engine"], r["mtp"]) for r in res["rows"]} == {("storyseek", False), ("storyseek", True),
                                                             ("transformers", False), ("transformers", True)}
    assert torch.is_grad_enabled()  # the benchmark leaves no global state behind
    assert "transformers" in bench_export.markdown(res)


def test_profile_decode_counts_the_work_of_a_plain_and_a_speculative_step(benchmarks, tmp_path):
    import bench_export
    import profile_decode

    model_dir = bench_export._export(None, "tiny", tmp_path)  # random weights: drafts mostly rejected
    res = profile_decode.run(str(model_dir), "cpu", tokens=8)
    plain, spec = res["rows"]
    assert plain["steps"] == plain["tokens"] == 8 and 5 <= spec["steps"] <= 8  # the prefill counts as one
    # Both steps counted: a few hundred operations at least (a verify runs the trunk on two tokens,
    # then MTP's block and the draft head; how many more than a plain step depends on the experts'
    # path in each, model/moe.py's moe_decode).
    assert plain["device_ops_per_step"] > 300 and spec["device_ops_per_step"] > 300
    assert plain["top"][0][1] > 0
    report = profile_decode.markdown(res)
    assert "| cost in plain steps |" in report and "A speculative step pays below" in report


def test_bench_sampling_compares_with_a_full_sort(benchmarks):
    import bench_sampling

    res = bench_sampling.run(quick=True, batches=(1,), repeats=2)
    assert len(res["rows"]) == len(bench_sampling.SHARPNESS)
    assert res["rows"][0]["nucleus_tokens"] < 10 < 10_000 < res["rows"][-1]["nucleus_tokens"]
    assert "full sort + multinomial" in bench_sampling.markdown(res)
