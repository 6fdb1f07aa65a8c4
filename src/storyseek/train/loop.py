"""The training loop (`storyseek train`), top to bottom in the spirit of nanoGPT's train.py.

    data -> model (fresh, --resume, --init-from) -> AdamW -> loop:
        every eval_interval: mean train/val next-token loss, console line, CSV, best_model.pt, latest.pt
        every checkpoint_interval: ckpt_<iter>.pt
        grad_accum micro-steps (autocast) -> clip -> AdamW step -> MoE bias update (all-reduced load)
    end (max_iters, --max-minutes): evaluate, final_model.pt, latest.pt, training_metrics.png
    SIGINT / SIGTERM: latest.pt, then exit; a non-finite loss: stop, keeping the last good checkpoints

Exact resume: latest.pt holds the optimizer, the gradient scaler, every RNG (torch, CUDA, numpy,
Python) and the batch sampler's generator as it was before drawing the next batch, per rank, so a
resumed run draws the same batches and (fp32, CPU) reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import inspect
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from ..checkpoint.pt import METRICS_CSV
from ..data.shards import load_meta, open_tokens
from ..data.tokenizer import load_tokenizer
from ..errors import StoryseekError
from ..model import ModelConfig, Transformer, get_preset, pad_vocab
from ..model.config import TRAINING_FIELDS
from ..model.info import count_parameters
from . import distributed
from .config import TrainConfig
from .metrics import (MetricsLog, console_line, detail_line, flops_per_token, gpu_memory_gb, gpu_peak_flops,
                      plot_metrics, ram_gb)
from .optim import configure_optimizer, lr_at
from .precision import autocast, resolve_dtype

# What --init-from may change: how the model trains, and its context (RoPE has no learned positions).
FINETUNE_FIELDS = (*TRAINING_FIELDS, "block_size")


class RandomWindows:
    """Batches of random [B, T] windows (x) and the windows one token later (y) from a token stream.

    The next batch is read ahead, so on a GPU the disk read and host->device copy overlap the step
    that is still running. `state()` is the generator state that redraws that pending batch."""

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, device: torch.device,
                 seed: int, state: torch.Tensor | None = None):
        self.data, self.B, self.T, self.device = data, batch_size, block_size, device
        self.gen = torch.Generator().manual_seed(seed)
        if state is not None:
            self.gen.set_state(state)
        self._state = self.gen.get_state()
        self._next = self._draw()

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.T, (self.B,), generator=self.gen).tolist()
        w = torch.from_numpy(np.stack([self.data[i : i + self.T + 1] for i in starts]).astype(np.int64))  # [B, T+1]
        x, y = w[:, :-1], w[:, 1:]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._next
        self._state = self.gen.get_state()
        self._next = self._draw()
        return batch

    def state(self) -> torch.Tensor:
        return self._state


def train(cfg: TrainConfig, model_cfg: ModelConfig | None = None) -> Path:
    """Train on `cfg.data` into `cfg.out`; returns the output directory.

    `model_cfg` replaces the preset as the base of a fresh model (the vocabulary always comes from
    the data). Under torchrun every rank calls this; rank 0 alone logs and writes files."""
    d = distributed.setup(cfg.device)
    try:
        return _train(cfg, model_cfg, d)
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, base_cfg: ModelConfig | None, d: distributed.Dist) -> Path:
    out, device, master = Path(cfg.out), d.device, d.is_master
    say = print if master else (lambda *a, **k: None)

    # ---------------------------------------------------------------- data
    meta = load_meta(cfg.data)
    train_data, val_data = open_tokens(cfg.data, "train"), open_tokens(cfg.data, "val")
    tokenizer = load_tokenizer(cfg.data)
    vocab_size = pad_vocab(meta["tokenizer"]["vocab_size"])

    # ----------------------------------------------------- where we start from
    resume_path = out / "latest.pt"
    if cfg.resume:
        start = load_checkpoint(resume_path)
        source = str(resume_path)
    elif cfg.init_from:
        start, source = load_pretrained(cfg.init_from), str(cfg.init_from)
    else:
        start, source = None, None
        if resume_path.exists():
            raise StoryseekError(f"{out} already holds a training run (latest.pt): add --resume to continue it, "
                                 "or choose another --out")
    if start is not None and start.get("tokenizer") and start["tokenizer"]["spec"] != tokenizer.spec:
        raise StoryseekError(f"{source} was trained with the {start['tokenizer']['spec']} tokenizer but {cfg.data} "
                             f"uses {tokenizer.spec}: train on data prepared with the same tokenizer")
    model_cfg = _model_config(cfg, base_cfg, start, source, vocab_size)
    T = cfg.block_size or model_cfg.block_size
    for split, data in (("train", train_data), ("val", val_data)):
        if len(data) <= T + 1:
            raise StoryseekError(f"{cfg.data}: the {split} split has {len(data):,} tokens, too few for "
                                 f"--block-size {T}; lower --block-size or prepare more data")

    # ---------------------------------------------------------------- model
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = Transformer(model_cfg)
    if start is not None:
        _load_weights(model, start["model"], source)
    model.to(device)
    dtype, why = resolve_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    optimizer = configure_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    iter_num, best_val, elapsed_before, evaluated = 0, math.inf, 0.0, False
    rng = None
    if cfg.resume:
        optimizer.load_state_dict(start["optimizer"])
        scaler.load_state_dict(start["scaler"])
        iter_num, best_val = start["iter"], start["best_val_loss"]
        elapsed_before, evaluated = start["elapsed"], start["evaluated"]
        rng = start["rng"][d.rank] if d.rank < len(start["rng"]) else None
    _seed_or_restore(cfg.seed + d.rank, rng, device)
    train_batches = RandomWindows(train_data, cfg.batch_size, T, device, cfg.seed + d.rank,
                                  rng["sampler"] if rng else None)
    del start

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers are not re-broadcast each forward: each rank's expert-load counts must stay its own
        # until the all-reduce, and the biases stay equal because every rank applies the same update.
        # Unused parameters: an expert may receive no tokens in a step.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None,
                    find_unused_parameters=model_cfg.n_moe_layers + model_cfg.mtp_depth > 0, **no_sync)
    ctx = autocast(device, dtype)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    tokens_per_iter = cfg.batch_size * T * cfg.grad_accum * d.world_size
    params = count_parameters(model_cfg)
    flops_per_iter = flops_per_token(model_cfg, T, params["active"], params["mtp"]) * tokens_per_iter
    peak = gpu_peak_flops(device)
    peak = peak * d.world_size if peak else None

    if master:
        out.mkdir(parents=True, exist_ok=True)
        say(f"training {params['total'] / 1e6:.2f}M parameters ({params['active'] / 1e6:.2f}M active non-embedding) "
            f"on {device}" + (f" x {d.world_size} ranks" if d.enabled else "") + f", {why}")
        say(f"{tokens_per_iter:,} tokens per iteration (batch {cfg.batch_size} x block {T} x grad_accum "
            f"{cfg.grad_accum} x {d.world_size} ranks); data {cfg.data}: {len(train_data):,} train tokens")
        if cfg.resume:
            say(f"resuming from {resume_path} at iter {iter_num}")
        elif cfg.init_from:
            say(f"initialized from {cfg.init_from}")
    log = MetricsLog(out, iter_num if cfg.resume else None, cfg.tensorboard, cfg.wandb, cfg.wandb_project,
                     {**cfg.to_dict(), "model_config": model_cfg.to_dict()}) if master else None

    def save(name: str, full: bool) -> None:
        """Every rank calls this (the RNG gather is collective); rank 0 writes OUT/name."""
        state = {"model_config": model_cfg.to_dict(), "tokenizer": tokenizer.to_dict(),
                 "model": raw_model.state_dict(), "iter": iter_num, "best_val_loss": best_val,
                 "train_config": cfg.to_dict(), "elapsed": elapsed_before + time.time() - t0}
        if full:
            state |= {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "evaluated": evaluated,
                      "rng": _gather_rng(_rng_state(train_batches, device), d)}
        if master:
            save_checkpoint(out / name, state)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        """Mean next-token loss per split over eval_iters batches per rank (the same batches every
        evaluation, so successive numbers compare), averaged over ranks. No MTP: runs compare."""
        raw_model.eval()
        losses = {}
        for i, (split, data) in enumerate((("train", train_data), ("val", val_data))):
            batches = RandomWindows(data, cfg.batch_size, T, device, seed=10_000 * (i + 1) + d.rank)
            total = torch.zeros((), device=device)
            for _ in range(cfg.eval_iters):
                x, y = next(batches)
                with ctx:
                    logits = raw_model(x).logits
                total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            losses[split] = distributed.all_reduce_sum(total, d).item() / (cfg.eval_iters * d.world_size)
        raw_model.train()
        return losses

    # SIGINT/SIGTERM only raise a flag; the loop saves latest.pt at the next step boundary.
    stop_signal: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    stats = _Interval(model_cfg, device)
    t0 = t_interval = time.time()
    first_iter, iters_interval = iter_num, 0

    def evaluate_and_report() -> None:
        nonlocal best_val, evaluated, t_interval, iters_interval
        stats.check_finite(iter_num, out)
        dt = time.time() - t_interval
        losses = estimate_loss()
        speed = tokens_per_iter * iters_interval / dt if iters_interval else None
        mfu = flops_per_iter * iters_interval / dt / peak if peak and iters_interval else None
        _report(log, iter_num, losses, lr, elapsed_before + time.time() - t0, stats, speed, mfu, device, out, say)
        if iter_num > 0 and losses["val"] < best_val:
            best_val = losses["val"]
            save("best_model.pt", full=False)
        evaluated = True
        t_interval, iters_interval = time.time(), 0

    try:
        while True:
            # Under --max-minutes the schedule follows whichever budget is nearer its end, so a
            # time-bounded run (the demo) still anneals to min_lr instead of stopping at peak lr.
            progress = iter_num if cfg.max_minutes <= 0 else max(
                iter_num, (time.time() - t0) / (60 * cfg.max_minutes) * decay_iters)
            lr = lr_at(progress, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, decay_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr

            if iter_num % cfg.eval_interval == 0 and not evaluated:
                evaluate_and_report()
                save("latest.pt", full=True)
            if cfg.checkpoint_interval and iter_num % cfg.checkpoint_interval == 0 and iter_num > first_iter:
                stats.check_finite(iter_num, out)
                save(f"ckpt_{iter_num}.pt", full=True)

            timed_out = cfg.max_minutes > 0 and time.time() - t0 > 60 * cfg.max_minutes
            if not d.enabled or iter_num % cfg.log_interval == 0:
                if distributed.any_rank(bool(stop_signal), d):
                    stats.check_finite(iter_num, out)
                    save("latest.pt", full=True)
                    say(f"interrupted at iter {iter_num}: saved {out / 'latest.pt'}; continue with --resume")
                    raise KeyboardInterrupt
                if distributed.any_rank(timed_out, d) and iter_num < cfg.max_iters:
                    say(f"--max-minutes {cfg.max_minutes:g} reached at iter {iter_num}")
                    break
            if iter_num >= cfg.max_iters:
                break

            # ---------------------------------------------------- one optimizer step
            for micro in range(cfg.grad_accum):
                if d.enabled:  # all-reduce gradients only on the last micro-step
                    model.require_backward_grad_sync = micro == cfg.grad_accum - 1
                x, y = next(train_batches)  # (it reads the following batch ahead, overlapping the device)
                with ctx:
                    o = model(x, y)
                scaler.scale(o.loss / cfg.grad_accum).backward()
                stats.add_losses(o)
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                stats.grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if stats.has_moe:
                load = distributed.all_reduce_sum(raw_model.expert_load(), d)  # [n_moe_layers, E]
                stats.load += load
                raw_model.update_expert_bias(load)
            iter_num += 1
            iters_interval += 1
            evaluated = False
            if iter_num % cfg.log_interval == 0:
                stats.check_finite(iter_num, out)
                stats.progress(iter_num, cfg.eval_interval, tokens_per_iter * iters_interval / (time.time() - t_interval), master)

        # --------------------------------------------------------------- the end
        if not evaluated:
            evaluate_and_report()
        save("final_model.pt", full=False)
        save("latest.pt", full=True)
        if master:
            png = plot_metrics(out / METRICS_CSV)
            say(f"done: {iter_num} iters, best val_loss {best_val:.4f}; wrote {out / 'final_model.pt'}, {png}")
    finally:
        stats.close_progress()
        for s, h in handlers.items():
            signal.signal(s, h)
        if log is not None:
            log.close()
    return out


# --------------------------------------------------------------------------------------- helpers


def _model_config(cfg: TrainConfig, base_cfg: ModelConfig | None, start: dict | None, source: str | None,
                  vocab_size: int) -> ModelConfig:
    """The model to train: the preset (or `base_cfg`) with the user's settings for a fresh run; the
    checkpoint's own config for --resume / --init-from, where settings may not change its shape."""
    if start is None:
        mc = (base_cfg or get_preset(cfg.preset)).replace(**cfg.model)
        return mc.replace(vocab_size=vocab_size, block_size=cfg.block_size or mc.block_size)
    mc = ModelConfig.from_dict(start["model_config"])
    if mc.vocab_size != vocab_size:
        raise StoryseekError(f"{source} has a vocabulary of {mc.vocab_size} ids but {cfg.data} needs {vocab_size}: "
                             "train on data prepared with the checkpoint's tokenizer")
    allowed = () if cfg.resume else FINETUNE_FIELDS
    differ = [f"{k} {getattr(mc, k)!r} (asked: {v!r})" for k, v in cfg.model.items()
              if getattr(mc, k) != v and k not in allowed]
    if differ:
        raise StoryseekError(f"{source} is a different model: {', '.join(differ)}; drop those settings"
                             + (" or use another --out" if cfg.resume else ""))
    if cfg.block_size and cfg.block_size > mc.block_size:
        raise StoryseekError(f"--block-size {cfg.block_size} exceeds the model's context of {mc.block_size} tokens ({source})")
    return mc.replace(**{k: v for k, v in cfg.model.items() if k in allowed})


def _load_weights(model: Transformer, state_dict: dict, source: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise StoryseekError(f"{source}: its weights do not fit this model ({first})") from None


def _rng_state(batches: RandomWindows, device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": random.getstate(),
            "sampler": batches.state()}


def _seed_or_restore(seed: int, rng: dict | None, device: torch.device) -> None:
    if rng is None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        return
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def _gather_rng(state: dict, d: distributed.Dist) -> list[dict]:
    """Every rank's RNG state (index = rank), so a resumed run redraws each rank's batches."""
    if not d.enabled:
        return [state]
    import torch.distributed as dist

    states = [None] * d.world_size
    dist.all_gather_object(states, state)
    return states


class _Interval:
    """Training-side numbers between two evaluations: loss parts, expert load, grad norm, a progress bar."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.device = device
        n_moe = cfg.n_moe_layers + cfg.mtp_depth
        self.has_moe, self.has_mtp = n_moe > 0, cfg.mtp_depth > 0
        self.load = torch.zeros(n_moe, cfg.n_routed_experts, device=device)
        self.sums = torch.zeros(4, device=device)  # main, mtp, balance, steps with a non-finite loss
        self.count = 0
        self.grad_norm: torch.Tensor | None = None
        self.bar = None

    def add_losses(self, o) -> None:
        # Accumulated on the device: no host sync per step.
        parts = [o.main_loss.detach(), o.mtp_loss.detach() if o.mtp_loss is not None else torch.zeros((), device=self.device),
                 o.balance_loss.detach() if o.balance_loss is not None else torch.zeros((), device=self.device)]
        parts = torch.stack(parts).float()
        self.sums[:3] += parts
        self.sums[3] += (~torch.isfinite(o.loss.detach())).float()
        self.count += 1

    def check_finite(self, iter_num: int, out: Path) -> None:
        if self.sums[3].item() > 0:
            raise StoryseekError(f"the loss became non-finite (nan/inf) before iter {iter_num}: training diverged; "
                                 f"lower --learning-rate or raise --warmup-iters (last good checkpoints kept in {out})")

    def take(self) -> dict:
        """Means since the last call, then reset."""
        s = (self.sums[:3] / max(1, self.count)).tolist()
        row = {"mtp_loss": s[1] if self.has_mtp and self.count else None,
               "balance_loss": s[2] if self.has_moe and self.count else None,
               "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
               "max_expert_load": None}
        if self.has_moe and self.load.sum() > 0:
            share = self.load / self.load.sum(dim=1, keepdim=True).clamp(min=1)  # [n_moe_layers, E]
            row["max_expert_load"] = share.max().item()
        self.sums.zero_()
        self.load.zero_()
        self.count = 0
        return row

    def progress(self, iter_num: int, eval_interval: int, tokens_per_sec: float, master: bool) -> None:
        if not master:
            return
        if self.bar is None:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, CI) — the eval lines remain.
            self.bar = tqdm(total=eval_interval, leave=False, disable=None, unit="it", dynamic_ncols=True)
        self.bar.n = iter_num % eval_interval or eval_interval
        self.bar.set_postfix_str(f"loss {self.sums[0].item() / max(1, self.count):.4f}, {tokens_per_sec:,.0f} tokens/s")

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _report(log: MetricsLog | None, iter_num: int, losses: dict, lr: float, elapsed: float, stats: _Interval,
            tokens_per_sec: float | None, mfu: float | None, device: torch.device, out: Path, say) -> dict:
    """Console lines and a CSV row for one evaluation."""
    stats.close_progress()
    if not (math.isfinite(losses["val"]) and math.isfinite(losses["train"])):
        raise StoryseekError(f"the loss became non-finite (nan/inf) at iter {iter_num}: training diverged; lower "
                             f"--learning-rate or raise --warmup-iters (last good checkpoints kept in {out})")
    row = {"iteration": iter_num, "train_loss": round(losses["train"], 6), "val_loss": round(losses["val"], 6),
           "learning_rate": lr, "elapsed_time": round(elapsed, 2), "gpu_memory_gb": round(gpu_memory_gb(device), 3),
           "tokens_per_sec": round(tokens_per_sec, 1) if tokens_per_sec else None,
           "mfu": round(mfu, 4) if mfu is not None else None, "ram_gb": round(ram_gb(), 3), **stats.take()}
    say(console_line(iter_num, losses["train"], losses["val"], lr, elapsed))
    say(detail_line(row, device))
    if log is not None:
        log.log(row)
    return row
