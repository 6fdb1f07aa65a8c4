"""Where storyseek computes and in which number format: the one meaning of --device and --dtype.

    device = resolve_device("auto")                        cuda -> mps -> cpu
    dtype, why = resolve_dtype("auto", device, shapes)     (torch dtype, the line to print)
    with autocast(device, dtype): ...                      training's forward
    compile, why = resolve_compile(None, device)           whether training runs torch.compile'd (None: measure)
    step = CompiledStep(model)                             a decode step compiled for every batch and length
    keep_freed_memory()                                    CPU training: freed memory is reused, not faulted in again

`--dtype auto`:
  - CUDA: bfloat16 where the GPU supports it (tensor cores; no probe), else float16 (training adds
    a gradient scaler).
  - CPU: measured, never guessed from CPU flags (an AVX512-BF16 CPU can run bf16 matmuls at 0.6x
    of fp32). A probe of at most ~0.5 s times matmuls of the model's own shapes in fp32 and bf16,
    alternating; bf16 only where it is clearly (BF16_MARGIN) faster. The result is cached per CPU
    model, thread count, torch version and shapes in ~/.cache/storyseek/dtype_probe.json
    (STORYSEEK_CACHE_DIR moves it, STORYSEEK_NO_CACHE=1 turns the cache off).
  - MPS: float32.

Decoding on a CPU also measures how its few-row products run fastest (model/linear.py): the row
count up to which `weight @ x^T` beats `x @ weight^T` for the model's own weights, cached the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import importlib.util
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import StoryseekError
from .files import atomic_write
from .model.linear import weight_major

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_MARGIN = 1.15  # bf16 must be this much faster than fp32 to be chosen
PROBE_SECONDS = 0.5
PROBE_FLOPS = 1e8  # per timed matmul: rows, then columns, are cut so one takes milliseconds
PROBE_MIN_ROWS = 64  # a training product's rows are cut to no fewer: fewer is a matrix-vector product
WEIGHT_MAJOR_PROBE_ROWS = (1, 2, 4, 8)  # decode batches the layout probe times
WEIGHT_MAJOR_MARGIN = 1.1  # weight-major must be this much faster to be used
COMPILE_PROBE_ITERS = 20  # --compile auto on a CPU: eager iterations timed before deciding
COMPILE_PAYS_S = 600  # ... then compiled when the rest of the run would take longer than this eagerly
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64 bits: blocks below it come from the reusable heap
TRIM_THRESHOLD = 1 << 30  # free memory the heap keeps at its top instead of returning it

Shape = tuple[int, int, int]  # (rows, in, out) of a matmul x[rows, in] @ w[in, out]


def resolve_device(name: str = "auto") -> torch.device:
    """`--device`: auto is cuda, then mps, then cpu; StoryseekError for a device that is not here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StoryseekError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StoryseekError(f"--device {name}: no CUDA GPU is available to PyTorch here; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise StoryseekError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise StoryseekError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device, shapes: Sequence[Shape] = (),
                  decode: bool = False) -> tuple[torch.dtype, str]:
    """(compute dtype, why) for `--dtype name` on `device`; `shapes` are the model's matmuls that
    the CPU probe times (`decode`: few-row products, each dtype in its faster layout).
    StoryseekError when the device cannot compute in that dtype."""
    kind = device.type
    if name == "auto":
        if kind == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "bfloat16 (CUDA GPU with bf16)"
            return torch.float16, "float16 with a gradient scaler (CUDA GPU without bf16)"
        if kind == "cpu":
            speedup, cached = bf16_speedup(shapes, decode)
            source = "cached measurement" if cached else "measured just now"
            if speedup >= BF16_MARGIN:
                return torch.bfloat16, f"bf16 {speedup:.1f}x faster than fp32 here ({source}): bfloat16"
            return torch.float32, f"bf16 {speedup:.1f}x of fp32 here ({source}): float32"
        return torch.float32, f"float32 ({kind} device)"
    if name not in DTYPES:
        raise StoryseekError(f"unknown --dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and kind != "cuda":
        raise StoryseekError(f"--dtype float16 needs a CUDA GPU (device is {kind}); use --dtype auto, float32 or bfloat16")
    if dtype == torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise StoryseekError("--dtype bfloat16: this GPU does not support bf16; use --dtype auto or float16")
    if dtype == torch.bfloat16 and kind == "mps":
        raise StoryseekError("--dtype bfloat16 is not supported on mps; use --dtype float32")
    return dtype, name


def autocast(device: torch.device, dtype: torch.dtype):
    """Training's forward context: autocast to `dtype`, or nothing for fp32 (weights stay fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_compile(requested: bool | None, device: torch.device, ranks: int = 1) -> tuple[bool | None, str]:
    """(whether training runs torch.compile'd, why) for --compile, --no-compile or auto (None);
    None: not yet, compile_pays decides once the first iterations are timed (auto on a CPU).

    auto is on for a CUDA GPU: there the compiled step of the default preset ran at 1.7-2.3x the eager
    tokens/s on an H100 (fewer, fused kernels), after about a minute of compiling, which a run of
    hours repays at once. Inductor needs triton on a GPU (torch's Linux CUDA wheels bring it), and
    triton needs compute capability 7.0 or newer (a P100, still common on free notebooks, is 6.0).
    On a CPU it gained 1.15x (tiny preset) to 1.6x (default) after 45-105 s of compiling: a long run
    gains, a run of minutes loses, so the first iterations run eagerly and their speed decides. MPS
    is not a target of inductor's training kernels."""
    if requested is not None:
        return requested, "on" if requested else "off"  # as asked (--compile, --no-compile, the demo)
    if device.type == "cpu" and ranks == 1:
        return None, (f"off for the first {COMPILE_PROBE_ITERS} iterations (auto on a CPU: then on if their speed says "
                      f"the rest of the run would take over {COMPILE_PAYS_S // 60} minutes eagerly; --compile / "
                      f"--no-compile decide)")
    if device.type != "cuda":
        return False, f"off (auto: a {device.type} device" + (" under torchrun" if ranks > 1 else "") + \
            "; --compile turns it on)"
    if importlib.util.find_spec("triton") is None:
        return False, "off (auto: triton, which torch.compile needs on a GPU, is not installed)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return False, f"off (auto: triton needs a GPU of compute capability 7.0 or newer, this one is {major}.{minor})"
    return True, "on (auto: a CUDA GPU; --no-compile turns it off)"


def compile_pays(step_s: float, iters_left: int, seconds_left: float | None) -> tuple[bool, str]:
    """auto on a CPU, after COMPILE_PROBE_ITERS eager iterations of `step_s` seconds each: (whether
    compiling now pays, why). It does when the rest of the run, `iters_left` iterations or the
    `seconds_left` of --max-minutes, would take over COMPILE_PAYS_S eagerly. On a 2-core EPYC the
    default preset's step ran 1.62x faster compiled after 104 s of compiling (even after 3 minutes);
    in `storyseek train` the tiny preset's ran about 1.15x faster after 75 s (even near 9 minutes:
    an 11-minute run trained 3,288 iterations against 3,087 eagerly)."""
    eager_s = iters_left * step_s if seconds_left is None else min(iters_left * step_s, seconds_left)
    why = f"auto: an eager iteration took {step_s:.2f} s, the remaining {eager_s / 60:.1f} min"
    if eager_s > COMPILE_PAYS_S:
        return True, f"{why} repay the compiling"
    return False, f"{why} would not repay the compiling"


def require_compiler(device: torch.device) -> None:
    """--compile was asked for (train, generate, serve): one clear line where torch.compile cannot
    build kernels on `device`, instead of a traceback from inside the first compiled step."""
    if error := compiler_error(device):
        raise StoryseekError(f"--compile: torch.compile cannot build kernels here ({error}); install a C++ "
                             f"compiler (g++ or clang) or run without --compile")


@functools.cache
def compiler_error(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels on `device`, or None where it can. On a CPU inductor
    writes C++ and needs a working compiler (and OpenMP): a tiny function is compiled and run (about
    2 s, most of it importing what the real compile needs anyway). Once per process and device: the
    answer is kept (asked again under another grad mode, the function would compile again)."""
    if device.type != "cpu":
        return None
    try:
        torch.compile(lambda x: (x * 2).sum())(torch.ones(4))
    except Exception as e:  # noqa: BLE001 - inductor wraps compiler failures in several types
        lines = [line for line in str(e).splitlines() if line.strip()]
        return lines[0][:200] if lines else type(e).__name__
    return None


def resolve_train_graphs(requested: bool, compiled: bool, device: torch.device, ranks: int) -> tuple[bool, str]:
    """(whether the compiled training step replays as CUDA graphs, why) for --cuda-graphs.

    A compiled step of the default preset is ~1,000 kernels, and on an H100 the GPU waited 6 ms of a
    30 ms step for their launches; torch.compile's reduce-overhead mode records the forward and the
    backward as CUDA graphs and replays each with one launch. Only for one process: under torchrun
    DDP's gradient hooks run between the graphs, a combination not measured yet."""
    if not (requested and compiled and device.type == "cuda"):
        return False, ""
    if ranks > 1:
        return False, "without CUDA graphs (not under torchrun)"
    return True, "with CUDA graphs (--no-cuda-graphs turns them off)"


class CompiledStep:
    """`fn` (a decode step) through torch.compile with dynamic shapes: the batch and the attended
    length change every step without recompiling. `compile_s`: the seconds its calls spent compiling
    (the first call, and any recompile), so a run can report its speed after the compiling.

    Float attributes the step reads (norm eps, dropout p, the embedding's norm_type) stay constants:
    dynamic=True would trace them as symbols, which inductor then cannot keep, and dynamo restarts
    its whole analysis to specialize them (3.5 of the 9 s a warm compile of the demo's model took on
    a 2-core CPU). The config patch is active in each call (about 7 us), so recompiles get it too."""

    def __init__(self, fn: Callable):
        import torch._dynamo  # imported here: it costs a second or more, which only compiled runs pay

        self._graphs = torch._dynamo.utils.counters["stats"]  # "unique_graphs" grows by one per compile
        self._step = torch._dynamo.config.patch(specialize_float=True)(torch.compile(fn, dynamic=True))
        self.compile_s = 0.0

    def __call__(self, *args, **kwargs):
        graphs, started = self._graphs["unique_graphs"], time.perf_counter()
        out = self._step(*args, **kwargs)
        if self._graphs["unique_graphs"] != graphs:
            self.compile_s += time.perf_counter() - started
        return out


def keep_freed_memory() -> bool:
    """Make the C allocator keep the memory a CPU training step frees, for the next step to reuse.

    A step allocates and frees hundreds of MB of temporaries: activations, autocast copies,
    gradients, loss chunks. By default glibc returns blocks above a 128 KB-32 MB threshold to the
    kernel and trims the heap's top, so the next step faults every page back in and the kernel zeroes
    it: for the tiny preset's bf16 step on a 2-core CPU, 20,000 page faults and 40-50 ms of kernel
    time per step of ~280 ms. With these limits raised (mallopt) it had about 160 faults and 5-6 ms,
    and ran 1.2-1.3x faster (fp32 and the default preset: about the same speed; their largest
    blocks, over 32 MB, are still mapped per use). Peak memory does not change: a step needs that
    memory again anyway. Process-wide, like torch.set_num_threads. Linux with glibc only: elsewhere
    nothing changes and it returns False."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt (macOS)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# ------------------------------------------------------------------------------ the CPU probe


def bf16_speedup(shapes: Sequence[Shape], decode: bool = False) -> tuple[float, bool]:
    """(fp32 time / bf16 time for `shapes` on this CPU, whether it came from the cache); `decode`:
    each dtype in its faster few-row layout (see measure_bf16_speedup)."""
    shapes = [_probe_shape(s) for s in shapes or [(1024, 512, 2048)]]
    key = ",".join("x".join(map(str, s)) for s in shapes) + (" decode" if decode else "")
    return _cached(key, lambda: round(measure_bf16_speedup(shapes, decode=decode), 3))


def weight_major_rows(weights: Sequence[torch.Tensor]) -> tuple[dict[tuple[int, int], int], bool]:
    """({[out, in] weight shape: the row count up to which products with it run faster weight-major
    on this CPU (0: never)}, whether it came from the cache). Measured among all of `weights`, as a
    decode step reads them."""
    weights = list({w.data_ptr(): w.detach() for w in weights}.values())  # a tied head counts once
    shapes = sorted({tuple(w.shape) for w in weights})
    key = f"weight-major {weights[0].dtype} " + ",".join("x".join(map(str, s)) for s in shapes) + \
          f" ({sum(w.numel() for w in weights)} weights)"
    keys = {s: f"{key} | {s[0]}x{s[1]}" for s in shapes}
    known = {s: cached_probe(k) for s, k in keys.items()}
    if None not in known.values():
        return {s: int(rows) for s, rows in known.items()}, True
    rows = measure_weight_major_rows(weights)
    for s, k in keys.items():
        store_probe(k, rows[s])
    return rows, False


def _cached(key: str, measure: Callable[[], float]) -> tuple[float, bool]:
    """A probe's result for this machine and `key`: from the cache file, or measured now and
    stored. -> (result, whether it came from the cache)."""
    known = cached_probe(key)
    if known is not None:
        return known, True
    value = measure()
    store_probe(key, value)
    return value, False


def cached_probe(key: str) -> float | None:
    """What a probe measured for this machine (CPU model, threads, torch version) and `key`, or None."""
    path = _cache_path()
    return _read_cache(path).get(_machine_key(key)) if path else None


def store_probe(key: str, value: float) -> None:
    """Keep a probe's result for this machine and `key` (nothing where the cache is off or read-only)."""
    path = _cache_path()
    if not path:
        return
    cache = _read_cache(path)
    cache[_machine_key(key)] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump(cache, f, indent=1)
    except OSError:
        pass  # a read-only home: measure again next time


def _machine_key(key: str) -> str:
    return f"{_cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | {key}"


def measure_bf16_speedup(shapes: Sequence[Shape], seconds: float = PROBE_SECONDS, decode: bool = False) -> float:
    """Time x w^T for each shape in fp32 and bf16, in alternating rounds for about `seconds`; the
    best time per product over the rounds (the least disturbed by other processes). `decode`: each
    product is also timed weight-major (model/linear.py) and each dtype counts its faster layout,
    as decoding will run it."""
    shapes = [_probe_shape(s) for s in shapes]
    forms = (_x_wt, weight_major) if decode else (_x_wt,)
    pairs = {dtype: [(torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)) for m, k, n in shapes]
             for dtype in (torch.float32, torch.bfloat16)}
    best = {(dtype, i, form): float("inf") for dtype in pairs for i in range(len(shapes)) for form in forms}
    start = time.perf_counter()
    rounds = 0
    while rounds < 2 or (time.perf_counter() - start < seconds and rounds < 50):
        for dtype, mats in pairs.items():
            for i, (x, w) in enumerate(mats):
                for form in forms:
                    t = time.perf_counter()
                    form(x, w)
                    best[dtype, i, form] = min(best[dtype, i, form], time.perf_counter() - t)
        rounds += 1
    total = {dtype: sum(min(best[dtype, i, form] for form in forms) for i in range(len(shapes))) for dtype in pairs}
    return total[torch.float32] / total[torch.bfloat16]


def _x_wt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.T


def measure_weight_major_rows(weights: Sequence[torch.Tensor]) -> dict[tuple[int, int], int]:
    """Time every weight's product with 1, 2, 4, 8 rows of input both ways (five rounds, the best
    of each: a busy neighbour during one round must not decide it), added up per weight shape: for
    each shape, the largest row count up to which weight @ x^T is WEIGHT_MAJOR_MARGIN faster.
    Going through all of a model's weights reads each from memory, as a decode step does. Per shape,
    because one answer does not fit a whole model: on a Zen 4 EPYC the tiny preset's 1,664-row head
    ran 3x faster weight-major while its 128 x 128 products ran slower."""
    forms = (_x_wt, weight_major)
    shapes = sorted({tuple(w.shape) for w in weights})
    chosen = dict.fromkeys(shapes, 0)
    faster = set(shapes)  # shapes weight-major was faster for at every row count so far
    with torch.inference_mode():
        for rows in WEIGHT_MAJOR_PROBE_ROWS:
            inputs = {n: torch.randn(rows, n, dtype=weights[0].dtype) for n in {w.shape[1] for w in weights}}
            best = {(s, form): float("inf") for s in shapes for form in forms}
            for _ in range(5):
                for form in forms:
                    spent = dict.fromkeys(shapes, 0.0)
                    for w in weights:
                        t = time.perf_counter()
                        form(inputs[w.shape[1]], w)
                        spent[tuple(w.shape)] += time.perf_counter() - t
                    for s in shapes:
                        best[s, form] = min(best[s, form], spent[s])
            faster = {s for s in faster if best[s, _x_wt] >= WEIGHT_MAJOR_MARGIN * best[s, weight_major]}
            if not faster:
                break
            for s in faster:
                chosen[s] = rows
    return chosen


def _probe_shape(shape: Shape) -> Shape:
    """A smaller product where one would take long: the ratio, not the total, is what counts. Rows
    are cut first, but not below PROBE_MIN_ROWS, then the columns. Cut to the 1-2 rows its FLOPs
    allow, the default preset's head (1024 x 512 x 50304) became a matrix-vector product bound by
    memory, where bf16 measured 1.1x of fp32 on a Zen 4 EPYC; its training GEMMs ran 2.0-2.3x
    faster in bf16 there (forward, and both backward products), and its whole training step 1.21x
    (1.42x without MTP)."""
    m, k, n = shape
    m = max(min(m, PROBE_MIN_ROWS), min(m, int(PROBE_FLOPS / (2 * k * n))))
    return m, k, max(1, min(n, int(PROBE_FLOPS / (2 * m * k))))


def _cpu_name() -> str:
    """The CPU model, plus a digest of its feature flags: one model name can cover several chips."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: next((l.split(":", 1)[1].strip() for l in info if l.startswith(key)), "")
    return f"{field('model name')} [{hashlib.sha1(field('flags').encode()).hexdigest()[:8]}]"


def _cache_path() -> Path | None:
    if os.environ.get("STORYSEEK_NO_CACHE"):
        return None
    root = os.environ.get("STORYSEEK_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "storyseek"
    return Path(root) / "dtype_probe.json"


def _read_cache(path: Path) -> dict[str, float]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, (int, float))} if isinstance(cache, dict) else {}
