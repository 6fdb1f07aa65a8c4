"""--device, --dtype and training's --compile: one meaning of auto; the CPU's bf16 choice measured
(injected here), cached."""

import json
import platform
import subprocess
import sys

import pytest
import torch

from storyseek import device
from storyseek.device import (autocast, bf16_speedup, measure_bf16_speedup, resolve_device, resolve_dtype,
                              resolve_train_graphs)
from storyseek.errors import StoryseekError

CPU = torch.device("cpu")
SHAPES = [(512, 64, 1000), (512, 64, 96)]


@pytest.mark.parametrize("speedup, dtype, line", [
    (0.6, torch.float32, "bf16 0.6x of fp32 here (measured just now): float32"),
    (1.1, torch.float32, "bf16 1.1x of fp32 here (measured just now): float32"),  # not clearly faster
    (1.9, torch.bfloat16, "bf16 1.9x faster than fp32 here (measured just now): bfloat16"),
])
def test_auto_on_cpu_follows_the_measurement(monkeypatch, speedup, dtype, line):
    monkeypatch.setattr(device, "measure_bf16_speedup", lambda shapes, **kw: speedup)
    assert resolve_dtype("auto", CPU, SHAPES) == (dtype, line)


def test_the_measurement_is_cached_per_machine_and_torch(monkeypatch, tmp_path):
    monkeypatch.delenv("STORYSEEK_NO_CACHE")
    monkeypatch.setenv("STORYSEEK_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(device, "measure_bf16_speedup", lambda shapes, decode: calls.append(decode) or 1.9)
    assert bf16_speedup(SHAPES) == (1.9, False)
    assert bf16_speedup(SHAPES) == (1.9, True) and len(calls) == 1  # the second run reads the cache
    assert resolve_dtype("auto", CPU, SHAPES)[1].endswith("(cached measurement): bfloat16")
    key, = json.loads((tmp_path / "dtype_probe.json").read_text())
    assert torch.__version__ in key and f"{torch.get_num_threads()} threads" in key
    bf16_speedup([(64, 64, 64)])  # other shapes: measured anew
    assert len(calls) == 2
    assert bf16_speedup(SHAPES, decode=True) == (1.9, False) and calls[-1] is True  # decoding's layouts: its own entry
    (tmp_path / "dtype_probe.json").write_text("not json")  # a damaged cache is measured again, not fatal
    assert bf16_speedup(SHAPES) == (1.9, False)


def test_the_real_probe_is_short_and_never_touches_the_home_cache(monkeypatch, tmp_path):
    """The real measurement: a positive ratio within about half a second (its value is the host's)."""
    import time

    monkeypatch.undo()  # the real measure_bf16_speedup
    monkeypatch.setenv("STORYSEEK_CACHE_DIR", str(tmp_path))
    t = time.perf_counter()
    ratio = measure_bf16_speedup([(4096, 512, 50304)])
    assert ratio > 0 and time.perf_counter() - t < 5  # ~0.5 s (big shapes are cut), room for a busy machine
    assert measure_bf16_speedup([(1, 64, 300)], seconds=0.05, decode=True) > 0
    assert not (tmp_path / "dtype_probe.json").exists()  # measuring alone caches nothing


def test_explicit_dtypes_and_what_a_device_cannot_do():
    assert resolve_dtype("float32", CPU) == (torch.float32, "float32")
    assert resolve_dtype("bfloat16", CPU)[0] == torch.bfloat16
    with pytest.raises(StoryseekError, match="float16 needs a CUDA GPU"):
        resolve_dtype("float16", CPU)
    with pytest.raises(StoryseekError, match="unknown --dtype 'fp8'"):
        resolve_dtype("fp8", CPU)
    assert isinstance(autocast(CPU, torch.bfloat16), torch.autocast)


def test_device_auto_and_bad_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")  # cuda -> mps -> cpu, everywhere
    with pytest.raises(StoryseekError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(StoryseekError, match="unknown --device 'gpu0'"):
        resolve_device("gpu0")


def test_cuda_auto_keeps_bf16_without_a_probe(monkeypatch):
    monkeypatch.setattr(device, "measure_bf16_speedup", lambda shapes, **kw: pytest.fail("no probe on CUDA"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda"))[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    dtype, why = resolve_dtype("auto", torch.device("cuda"))
    assert dtype == torch.float16 and "gradient scaler" in why


def test_compile_auto_is_on_for_a_cuda_gpu_with_triton_only(monkeypatch):
    from importlib import util

    real = util.find_spec
    triton = {"here": True}
    monkeypatch.setattr(util, "find_spec", lambda name, *a: (object() if triton["here"] else None)
                        if name == "triton" else real(name, *a))
    capability = {"now": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability["now"])
    cuda = torch.device("cuda")
    assert device.resolve_compile(None, cuda) == (True, "on (auto: a CUDA GPU; --no-compile turns it off)")
    capability["now"] = (6, 0)  # a P100: too old for triton
    compile, why = device.resolve_compile(None, cuda)
    assert not compile and "compute capability 7.0 or newer, this one is 6.0" in why
    capability["now"] = (7, 5)
    compile, why = device.resolve_compile(None, CPU)
    assert compile is None and why.startswith("off for the first 20 iterations (auto on a CPU")  # measured first
    assert device.resolve_compile(None, CPU, ranks=2) == (False, "off (auto: a cpu device under torchrun; --compile turns it on)")
    assert device.resolve_compile(None, torch.device("mps"))[0] is False
    assert device.resolve_compile(True, CPU) == (True, "on")  # asked for: on any device
    assert device.resolve_compile(False, cuda) == (False, "off")
    triton["here"] = False  # e.g. Windows: inductor has no GPU backend without triton
    compile, why = device.resolve_compile(None, cuda)
    assert not compile and "triton" in why


def test_the_decode_layout_probe_is_cached_per_shape_and_the_real_one_returns_probed_row_counts(monkeypatch, tmp_path):
    monkeypatch.delenv("STORYSEEK_NO_CACHE")
    monkeypatch.setenv("STORYSEEK_CACHE_DIR", str(tmp_path))
    head = torch.randn(1000, 64)
    weights = [head, torch.randn(96, 64), head]  # a tied head is one weight
    seen = []
    measured = {(1000, 64): 4, (96, 64): 0}
    monkeypatch.setattr(device, "measure_weight_major_rows", lambda ws: seen.append(len(ws)) or measured)
    assert device.weight_major_rows(weights) == (measured, False)
    assert device.weight_major_rows(weights) == (measured, True) and seen == [2]
    assert device.weight_major_rows([w.bfloat16() for w in weights]) == (measured, False)  # per dtype
    keys = [k for k in json.loads((tmp_path / "dtype_probe.json").read_text()) if "bfloat16" not in k]
    assert len(keys) == 2 and all("weight-major torch.float32 96x64,1000x64" in k for k in keys)
    monkeypatch.undo()
    rows = device.measure_weight_major_rows(weights[:2])
    assert set(rows) == set(measured) and set(rows.values()) <= {0, *device.WEIGHT_MAJOR_PROBE_ROWS}


def test_each_linear_takes_the_layout_measured_for_its_weight_shape(monkeypatch):
    from storyseek.generate.load import to_inference
    from storyseek.model import ModelConfig, Transformer
    from storyseek.model.linear import Linear

    model = Transformer(ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, kv_lora_rank=16,
                                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_dense_layers=1,
                                    inter_dim=64, moe_inter_dim=16))
    monkeypatch.setattr(device, "measure_weight_major_rows",  # the head's shape only
                        lambda ws: {tuple(w.shape): 2 if w.shape == (96, 32) else 0 for w in ws})
    model = to_inference(model, torch.float32)
    rows = {name: m.weight_major_rows for name, m in model.named_modules() if isinstance(m, Linear)}
    assert rows["head"] == 2 and all(r == 0 for name, r in rows.items() if name != "head")




FAULTS = """
import ctypes, resource, sys, torch
from storyseek.device import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
torch.set_num_threads(1)
mallopt = ctypes.CDLL("libc.so.6").mallopt
mallopt(M_MMAP_THRESHOLD, 128 << 10)  # glibc's starting limits, held fixed: every block
mallopt(M_TRIM_THRESHOLD, 128 << 10)  # above 128 KB goes back to the kernel when freed
if sys.argv[1] == "keep":
    keep_freed_memory()
def step():  # ten 3 MB temporaries alive together, then freed, as in a training step
    return sum(float(t[0]) for t in [torch.ones(3 << 18) for _ in range(10)])
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_keep_freed_memory_stops_the_page_faults_of_repeated_temporaries():
    def faults_per_step(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)

    assert faults_per_step("returned") > 5000  # 30 MB of pages faulted in again every step ...
    assert faults_per_step("keep") < 100  # ... or kept, and reused (the heap may still grow once)


def test_train_graphs_only_for_a_compiled_step_on_one_cuda_gpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # (only the device type is read: no GPU needed)
    assert resolve_train_graphs(True, True, cuda, 1) == (True, "with CUDA graphs (--no-cuda-graphs turns them off)")
    assert resolve_train_graphs(True, True, cuda, 2) == (False, "without CUDA graphs (not under torchrun)")
    for asked, compiled, device in ((False, True, cuda), (True, False, cuda), (True, True, cpu)):
        assert resolve_train_graphs(asked, compiled, device, 1) == (False, "")


def test_dtype_probe_times_training_products_as_matrix_products():
    """The probe shrinks a long product to ~PROBE_FLOPS, but a training product keeps at least
    PROBE_MIN_ROWS rows (cut to 1-2 rows, the default preset's head became a memory-bound
    matrix-vector product that said bf16 1.1x where its GEMMs ran 2x faster); decode shapes stay."""
    for shape in ((12288, 512, 50304), (1024, 512, 256), (2048, 128, 2048)):
        m, k, n = device._probe_shape(shape)
        assert m >= device.PROBE_MIN_ROWS and k == shape[1] and 2 * m * k * n <= device.PROBE_FLOPS
    assert device._probe_shape((8, 128, 1664)) == (8, 128, 1664)


def test_compile_pays_only_when_the_rest_of_the_run_would_take_long_eagerly():
    assert device.COMPILE_PAYS_S == 600
    pays, why = device.compile_pays(0.2, 5000, None)  # 1,000 s eagerly
    assert pays and why == "auto: an eager iteration took 0.20 s, the remaining 16.7 min repay the compiling"
    assert not device.compile_pays(0.2, 2000, None)[0]  # 400 s
    pays, why = device.compile_pays(0.2, 5000, 240.0)  # --max-minutes ends it in 4 minutes
    assert not pays and why.endswith("the remaining 4.0 min would not repay the compiling")
    assert device.compile_pays(31.0, 1000, 3600.0)[0]  # the default preset on a laptop: hours
