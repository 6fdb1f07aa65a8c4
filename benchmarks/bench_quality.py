"""Do MLA, MoE and MTP pay for themselves? Equal-budget training runs of four architectures.

    python benchmarks/bench_quality.py --quick        # ~10 minutes on 2 CPU cores: the method, not the answer
    python benchmarks/bench_quality.py                # the README's table (~25 minutes on 2 quiet cores)
    python benchmarks/bench_quality.py --device cuda  # the default preset, longer, on a GPU

Variants, each at the same *active* non-embedding parameters per token (the dense FFN width is
solved so the count matches ours within 0.5%), the same tokenizer, data, seeds and budget:

    MLA + MoE + MTP   ours: the preset as it is
    MLA + MoE         MTP off (--multi-token 1)
    MLA + dense       MoE replaced by a dense SwiGLU in every block (--ffn dense)
    MHA + dense       a plain GPT: standard multi-head attention (head width n_embd / n_head, half of
                      it rotary) and dense SwiGLU (--attention mha --ffn dense)

The budget. Six processes share this project's 2-core CI machine, so wall-clock seconds measured at
different moments are not comparable. Each run therefore gets the same *process CPU time* at one
thread (OMP_NUM_THREADS=1): the CPU-seconds per optimizer step of every variant are measured first,
interleaved, in this process at one thread, and each run's --max-iters is the budget divided by its
variant's cost, so the learning-rate schedule anneals fully within the budget. On a quiet machine
one thread's CPU time is its wall-clock time. With --device cuda the budget is GPU wall-clock
seconds instead (measured the same way, with synchronisation).

Reported per variant: held-out bits per byte (`storyseek eval` on the prepared validation split:
comparable across tokenizers), tokens seen, tokens per CPU-second (the calibration), and the story
checks (`storyseek eval --stories`). The two ends of the table run with several seeds, so the spread
shows the noise. A second table runs every variant for the number of steps ours got: equal tokens seen.

Every run is a plain `storyseek train` / `storyseek eval` command (printed in the JSON), so any row
can be reproduced by hand. A CPU-second is not the same amount of work on an idle and on a loaded
machine (caches and memory bandwidth are shared): the same command buys about 15% more steps on an idle
one. `--steps-from RESULTS.json` reuses an earlier run's measured seconds per step, so every run
trains exactly as many steps as it did; on one thread, with the same seeds, the numbers then repeat.
Data: the real stories in ../shared/data (the script exits with a reason when they are absent),
prepared once with a trained byte-level BPE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
VARIANTS = ("MLA + MoE + MTP", "MLA + MoE", "MLA + dense", "MHA + dense")
ENDS = (VARIANTS[0], VARIANTS[-1])

# preset, tokenizer, CPU-s (or GPU-s) of training per run, seeds at the ends of the table, stories per run
MODES = {
    "quick": dict(preset="tiny", tokenizer="bpe:2048", budget=40.0, seeds=2, stories=8, story_tokens=120, workers=2),
    "full": dict(preset="tiny", tokenizer="bpe:2048", budget=240.0, seeds=3, stories=16, story_tokens=200, workers=2),
    "cuda": dict(preset="default", tokenizer="gpt2", budget=600.0, seeds=3, stories=32, story_tokens=300, workers=1),
}


# ---------------------------------------------------------------------------------- variants
def variant_settings(name: str, preset: str) -> dict:
    """ModelConfig fields (beyond the preset) of a variant, at the preset's active parameters per token."""
    from storyseek.model import get_preset
    from storyseek.model.info import count_parameters

    base = get_preset(preset)
    settings = {"MLA + MoE + MTP": {}, "MLA + MoE": {"mtp_depth": 0},
                "MLA + dense": {"mtp_depth": 0, "ffn": "dense"},
                "MHA + dense": {"mtp_depth": 0, "ffn": "dense", "attention": "mha"}}[name]
    if name == "MHA + dense":  # a GPT's heads: n_embd / n_head wide for queries, keys and values
        head = base.n_embd // base.n_head
        rope = min(base.qk_rope_head_dim, head)
        settings |= {"qk_nope_head_dim": head - rope, "qk_rope_head_dim": rope, "v_head_dim": head}
    if settings.get("ffn") == "dense":
        # active parameters are linear in the dense width: solve for the width that matches ours
        target = count_parameters(base)["active"]
        at = {w: count_parameters(base.replace(**settings, inter_dim=w))["active"] for w in (64, 128)}
        slope = (at[128] - at[64]) / 64
        settings["inter_dim"] = round(64 + (target - at[64]) / slope)
    return settings


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        if k == "mtp_depth":
            out += ["--multi-token", str(v + 1)]
        else:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


# --------------------------------------------------------------------------------- calibration
def calibrate(data_dir: Path, preset: str, device: str, reps: int = 3, steps: int = 4) -> dict[str, float]:
    """Seconds of one optimizer step per variant (CPU: process time at one thread; CUDA: synchronised
    wall time), measured interleaved, `reps` rounds of `steps` steps after a warm-up; the median round."""
    import numpy as np
    import torch

    from storyseek.data.shards import load_meta, open_tokens
    from storyseek.model import Transformer, get_preset, pad_vocab
    from storyseek.train.config import TRAIN_PRESETS, TrainConfig
    from storyseek.train.optim import configure_optimizer

    torch.set_num_threads(1)
    dev = torch.device(device)
    meta = load_meta(data_dir)
    tokens = np.asarray(open_tokens(data_dir, "train"))
    tcfg = TrainConfig(**TRAIN_PRESETS[preset])
    base = get_preset(preset).replace(vocab_size=pad_vocab(meta["tokenizer"]["vocab_size"]))
    B, T = tcfg.batch_size, base.block_size
    rng = np.random.default_rng(0)
    setups = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model = Transformer(base.replace(**variant_settings(name, preset))).to(dev).train()
        opt = configure_optimizer(model, tcfg.learning_rate, tcfg.weight_decay, (tcfg.beta1, tcfg.beta2), dev.type)
        setups[name] = (model, opt)

    def step(name: str) -> None:
        model, opt = setups[name]
        starts = rng.integers(0, len(tokens) - T - 1, B)
        w = torch.from_numpy(np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64)).to(dev)
        model(w[:, :-1], w[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if model.moe_layers():
            model.update_expert_bias()

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            return time.perf_counter()
        return time.process_time()

    for name in VARIANTS:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(reps):
        for name in VARIANTS:
            t0 = clock()
            for _ in range(steps):
                step(name)
            times[name].append((clock() - t0) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ------------------------------------------------------------------------------------- runs
def _run(cmd: list[str], env: dict, log: Path) -> tuple[float, float, str]:
    """Run a storyseek command; (child CPU seconds, wall seconds, stdout). A failure raises with its log."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-2000:]}")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - t0, out


def run_one(job: dict, data_dir: Path, work: Path, mode: dict, device: str, env: dict) -> dict:
    out = work / job["id"]
    storyseek = [sys.executable, "-m", "storyseek"]
    train = [*storyseek, "train", "--data", str(data_dir), "--out", str(out), "--preset", mode["preset"],
             "--max-iters", str(job["iters"]), "--eval-interval", str(job["iters"]), "--eval-iters", "4",
             "--checkpoint-interval", "0", "--seed", str(job["seed"]), "--device", device,
             "--dtype", "float32" if device == "cpu" else "auto", *_flags(job["settings"])]
    cpu, wall, _ = _run(train, env, work / f"{job['id']}.train.log")
    evaluate = [*storyseek, "eval", "--model", str(out / "final_model.pt"), "--data", str(data_dir), "--json",
                "--device", device, "--stories", str(mode["stories"]), "--max-tokens", str(mode["story_tokens"]),
                "--seed", "1234"]
    _, eval_wall, text = _run(evaluate, env, work / f"{job['id']}.eval.log")
    report = json.loads(text)
    (src,) = report["sources"]
    return {**job, "train_cpu_s": round(cpu, 1), "train_wall_s": round(wall, 1), "eval_wall_s": round(eval_wall, 1),
            "val_bpb": src["bits_per_byte"], "val_loss": src["loss"], "stories": report["stories"],
            "commands": [" ".join(train), " ".join(evaluate)]}


def run(quick: bool = True, device: str = "cpu", budget: float | None = None, seeds: int | None = None,
        workers: int | None = None, work: str | None = None, step_seconds: dict[str, float] | None = None) -> dict:
    mode = dict(MODES["cuda" if device.startswith("cuda") else "quick" if quick else "full"])
    mode |= {k: v for k, v in dict(budget=budget, seeds=seeds, workers=workers).items() if v is not None}
    if not SHARED_DATA.is_dir():
        return {"skipped": f"the real stories are not at {SHARED_DATA}"}
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="storyseek-quality-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    data_dir = work_dir / f"data-{mode['tokenizer'].replace(':', '')}"
    files = sorted(str(p) for p in SHARED_DATA.glob("*.jsonl"))
    _run([sys.executable, "-m", "storyseek", "prepare", "--data-files", *files, "--tokenizer", mode["tokenizer"],
          "--out", str(data_dir)], env, work_dir / "prepare.log")

    t0 = time.time()
    step_s = step_seconds or calibrate(data_dir, mode["preset"], device)
    from storyseek.model import get_preset
    from storyseek.model.info import count_parameters
    from storyseek.train.config import TRAIN_PRESETS, TrainConfig

    tcfg = TrainConfig(**TRAIN_PRESETS[mode["preset"]])
    tokens_per_iter = tcfg.batch_size * get_preset(mode["preset"]).block_size
    settings = {name: variant_settings(name, mode["preset"]) for name in VARIANTS}
    iters = {name: max(10, round(mode["budget"] / step_s[name])) for name in VARIANTS}
    jobs = []
    for name in VARIANTS:
        for seed in range(1337, 1337 + (mode["seeds"] if name in ENDS else 1)):
            jobs.append({"table": "equal_budget", "variant": name, "seed": seed, "iters": iters[name],
                         "settings": settings[name]})
    for name in VARIANTS[1:]:  # equal tokens: the steps ours got (ours' own run is in the first table)
        jobs.append({"table": "equal_tokens", "variant": name, "seed": 1337, "iters": iters[VARIANTS[0]],
                     "settings": settings[name]})
    for i, job in enumerate(jobs):
        job["id"] = f"{i:02d}-{job['table']}-{job['variant'].replace(' + ', '-').lower()}-{job['seed']}"
        job["tokens"] = job["iters"] * tokens_per_iter
    print(f"{len(jobs)} runs in {work_dir}; seconds per step: "
          + ", ".join(f"{k} {v:.3f}" for k, v in step_s.items()), file=sys.stderr, flush=True)
    with ThreadPoolExecutor(mode["workers"]) as pool:
        results = list(pool.map(lambda j: run_one(j, data_dir, work_dir, mode, device, env), jobs))
    meta = json.loads((data_dir / "meta.json").read_text())
    return {"mode": mode, "device": device, "work_dir": str(work_dir), "wall_s": round(time.time() - t0, 1),
            "data": {"files": [Path(f).name for f in files], "tokenizer": mode["tokenizer"],
                     "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"],
                     "val_documents": meta["splits"]["val"]["documents"]},
            "step_seconds": step_s, "tokens_per_iter": tokens_per_iter,
            "parameters": {name: count_parameters(get_preset(mode["preset"]).replace(**settings[name]))
                           for name in VARIANTS},
            "settings": settings, "runs": results}


# ----------------------------------------------------------------------------------- report
def _mean_sd(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def markdown(res: dict) -> str:
    if "skipped" in res:
        return f"bench_quality skipped: {res['skipped']}"
    unit = "GPU-s" if res["device"].startswith("cuda") else "CPU-s"
    lines = []
    for table, title in (("equal_budget", f"equal budget: {res['mode']['budget']:g} {unit} of training per run"),
                         ("equal_tokens", "equal tokens seen: every variant trained for ours' steps")):
        lines += [f"**{title}**", "",
                  "| variant | active / total params | seeds | held-out bits/byte | tokens seen | tokens per "
                  f"{unit} | stories ended | repeated 4-grams | distinct-2 | words | moral |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in VARIANTS:
            runs = [r for r in res["runs"] if r["variant"] == name and
                    (r["table"] == table or (table == "equal_tokens" and name == VARIANTS[0] and r["seed"] == 1337))]
            if not runs:
                continue
            p = res["parameters"][name]
            st = [r["stories"] for r in runs]
            moral = [s["moral"] for s in st if s["moral"] is not None]
            lines.append(
                f"| {name} | {p['active'] / 1e6:.2f}M / {(p['total'] - p['embedding']) / 1e6:.2f}M | {len(runs)} | "
                f"{_mean_sd([r['val_bpb'] for r in runs], '.4f')} | {runs[0]['tokens'] / 1e6:.2f}M | "
                f"{res['tokens_per_iter'] / res['step_seconds'][name]:,.0f} | "
                f"{statistics.mean(s['ended'] for s in st):.0%} | {statistics.mean(s['repeat_4gram'] for s in st):.1%} | "
                f"{statistics.mean(s['distinct_2'] for s in st):.3f} | {statistics.mean(s['mean_words'] for s in st):.0f} | "
                + (f"{statistics.mean(moral):.0%} |" if moral else "n/a |"))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small budget, 2 seeds at the ends (~10 minutes on 2 cores)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: the default preset, GPU-seconds budget")
    ap.add_argument("--budget", type=float, help="seconds of training per run (CPU-s at one thread; GPU-s on cuda)")
    ap.add_argument("--seeds", type=int, help="seeds for the two ends of the table")
    ap.add_argument("--workers", type=int, help="runs in parallel (default: 2 on CPU, 1 on cuda)")
    ap.add_argument("--work", help="keep runs, logs and checkpoints here (default: a temporary directory)")
    ap.add_argument("--out", default=str(HERE / "quality.json"), help="results JSON (default: benchmarks/quality.json)")
    ap.add_argument("--steps-from", metavar="JSON",
                    help="reuse the seconds per step an earlier run measured (its results JSON), so every run "
                         "trains the same number of steps and the numbers repeat exactly")
    args = ap.parse_args(argv)
    step_seconds = None
    if args.steps_from:
        try:
            step_seconds = dict(json.loads(Path(args.steps_from).read_text())["step_seconds"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--steps-from {args.steps_from}: not a bench_quality results file ({type(e).__name__}: {e})")
    sys.path.insert(0, str(ROOT / "src"))
    from run import machine

    load = os.getloadavg()
    res = run(quick=args.quick, device=args.device, budget=args.budget, seeds=args.seeds, workers=args.workers,
              work=args.work, step_seconds=step_seconds)
    if "skipped" in res:
        print(markdown(res))
        return 0
    res["machine"] = {**machine(), "load_before": load, "load_after": os.getloadavg()}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    m = res["machine"]
    print(f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}; load average "
          f"{load[0]:.1f} before, {m['load_after'][0]:.1f} after; {res['wall_s'] / 60:.1f} minutes.\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
