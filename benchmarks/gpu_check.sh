#!/usr/bin/env bash
# One short call on a fresh GPU machine (about 8 minutes on an H100): the default preset's training
# speed in bf16, eager and torch.compile'd: tokens/s, MFU, graph breaks, peak GPU memory; decoding
# speed against transformers, random and trained weights (bench_generate.py; DECODE=0 skips it,
# TRAIN_MINUTES sets the tiny model's training, default 0.5); then, if a prepared data folder
# is given, `storyseek train --compile` end to end on it.
#
#   bash benchmarks/gpu_check.sh [DATA_DIR]       # DATA_DIR: from `storyseek prepare` (optional)
#
# Runs from a source checkout without installing it (PYTHONPATH=src); needs a python with CUDA torch.
# Overrides for a dry run of the same code on a CPU (what CI can check):
#   DEVICE=cpu PRESET=tiny BATCH=2 SEQ=64 STEPS=2 DTYPE=float32 bash benchmarks/gpu_check.sh
# MODES="eager" (or "compile") runs one of the two; "reduce-overhead" adds torch.compile's mode of that
# name (CUDA graphs around the compiled forward and backward). PROFILE=1 prints, per mode, how much of a
# step the GPU is busy and its top kernels (torch.profiler, 3 steps). DECODE_MODEL=CKPT (a trained model
# with MTP, e.g. the demo's best_model.pt) adds profile_decode.py on it: plain against speculative steps.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
DATA="${1:-}"
export DEVICE="${DEVICE:-cuda}" PRESET="${PRESET:-default}" BATCH="${BATCH:-12}" SEQ="${SEQ:-1024}"
export STEPS="${STEPS:-20}" DTYPE="${DTYPE:-bfloat16}" MODES="${MODES:-eager compile}" PROFILE="${PROFILE:-0}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'EOF'
import os, statistics, time

import torch
from torch._dynamo.utils import counters

from storyseek.device import autocast, resolve_device, resolve_dtype
from storyseek.model import Transformer, get_preset
from storyseek.model.info import count_parameters
from storyseek.train.metrics import flops_per_token, gpu_peak_flops
from storyseek.train.optim import allocate_gradients, configure_optimizer

device = resolve_device(os.environ["DEVICE"])
dtype = resolve_dtype(os.environ["DTYPE"], device)[0]
B, T, steps = int(os.environ["BATCH"]), int(os.environ["SEQ"]), int(os.environ["STEPS"])
cfg = get_preset(os.environ["PRESET"]).replace(block_size=max(T, 2))
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
      f"preset {os.environ['PRESET']}, batch {B} x {T}, {dtype}")
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
p = count_parameters(cfg)
flops = flops_per_token(cfg, T, p["active"], p["mtp"])
peak = gpu_peak_flops(device)

for mode in os.environ["MODES"].split():
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    opt = configure_optimizer(model, 3e-4, 0.1, (0.9, 0.95), device.type)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    # Graph breaks counted as the first step compiles (dynamo's explain() ran the traced graph once more
    # through an interpreter, which ran out of memory at batch 48 x 1024 on an H100).
    torch._dynamo.reset()
    counters.clear()
    fwd = model if mode == "eager" else torch.compile(model, mode=None if mode == "compile" else mode)
    graphs = mode == "reduce-overhead"
    if graphs:  # as `train` does
        allocate_gradients(model)

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, dtype):
            loss = fwd(x, y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=not graphs)
        model.update_expert_bias()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach().clone()  # reduce-overhead: a graph output is overwritten by the next replay

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    first = step()
    warm = time.perf_counter() - t
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        last = step()
        times.append(time.perf_counter() - t)
    tps = B * T / statistics.median(times)
    reasons = [r.splitlines()[0] for r in counters["graph_break"]][:3]
    breaks = "-" if mode == "eager" else f"{sum(counters['graph_break'].values())} ({'; '.join(reasons) or 'none'})"
    mfu = f"{100 * flops * tps / peak:.1f}%" if peak else "- (no known peak for this device)"
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "-"
    print(f"{mode:15s} tokens/s {tps:,.0f} | MFU {mfu} | graph breaks {breaks} | peak memory {mem} | "
          f"first step {warm:.1f}s | loss {first.item():.3f} -> {last.item():.3f}", flush=True)
    if os.environ["PROFILE"] == "1" and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels)  # microseconds, 3 steps
        print(f"  GPU busy {busy / 3e3:.1f} ms of a {1e3 * statistics.median(times):.1f} ms step; top kernels:")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]:
            print(f"  {100 * e.self_device_time_total / busy:5.1f}% {e.self_device_time_total / 3e3:6.2f} ms "
                  f"x{e.count // 3:<4d} {e.key[:100]}")
    del model, opt, fwd
    if device.type == "cuda":
        torch.cuda.empty_cache()
EOF

if [ "$DEVICE" = cuda ] && [ "${DECODE:-1}" = 1 ]; then  # decoding: CUDA graphs, transformers side by side
  "$PYTHON" benchmarks/bench_generate.py --device cuda --train-minutes "${TRAIN_MINUTES:-0.5}" --skip-no-cache --repeats 2
fi

if [ "$DEVICE" = cuda ] && [ -n "${DECODE_MODEL:-}" ]; then  # where a decode step's GPU time goes
  "$PYTHON" benchmarks/profile_decode.py --model "$DECODE_MODEL" --device cuda --tokens 200
fi

if [ -n "$DATA" ]; then
  OUT="$(mktemp -d)/run"
  "$PYTHON" -m storyseek train --data "$DATA" --out "$OUT" --preset "$PRESET" --device "$DEVICE" \
    --dtype auto --compile --batch-size "$BATCH" --block-size "$SEQ" --max-iters 60 --eval-interval 30 \
    --eval-iters 5 --warmup-iters 10
fi
