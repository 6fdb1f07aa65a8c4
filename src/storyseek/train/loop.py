"""The training loop (`storyseek train`), top to bottom in the spirit of nanoGPT's train.py.

    train(cfg)
      Trainer(cfg)      setup: data -> model (fresh, --resume, --init-from) -> AdamW -> compile / DDP
      Trainer.run()     the loop:
        every eval_interval: mean train/val next-token loss, console line, CSV, best_model.pt, latest.pt
        every checkpoint_interval: ckpt_<iter>.pt
        step(): grad_accum micro-steps (autocast) -> clip -> AdamW step -> MoE bias update (all-reduced load)
      the end (max_iters, --max-minutes): evaluate, final_model.pt, latest.pt, training_metrics.png

SIGINT / SIGTERM: latest.pt, then exit with the usual message. The signal only raises a flag, read
between steps and between evaluation batches, so it is acted on within a step or a batch (a cluster
gives ~30 s before SIGKILL); a second signal stops at once. A non-finite loss stops the run, keeping
the last good checkpoints.

Exact resume: latest.pt holds the optimizer, the gradient scaler and the `TrainState` (progress, and
every RNG: torch, CUDA, numpy, Python, and the batch sampler's generator as it was before drawing the
next batch, per rank), so a resumed run draws the same batches and (fp32, CPU) reproduces the
uninterrupted run's losses.
"""

from __future__ import annotations

import inspect
import math
import random
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from ..checkpoint.pt import BEST, FINAL, LATEST, METRICS_CSV
from ..data.batches import RandomWindows
from ..device import (COMPILE_PROBE_ITERS, autocast, compile_pays, compiler_error, keep_freed_memory, require_compiler,
                      resolve_compile, resolve_dtype, resolve_train_graphs)
from ..data.shards import load_meta, open_tokens
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..errors import StoryseekError
from ..memory import check_fits, local_processes, train_step_bytes
from ..model import ModelConfig, Transformer, get_preset, pad_vocab
from ..model.config import TRAINING_FIELDS
from ..model.info import count_parameters
from ..model.loss import token_nats
from . import distributed
from .config import TrainConfig
from .metrics import (MetricsLog, console_line, detail_line, flops_per_token, gpu_memory_gb, gpu_peak_flops,
                      plot_metrics, ram_gb)
from .optim import allocate_gradients, configure_optimizer, lr_at

# What --init-from may change: how the model trains, and its context (RoPE has no learned positions).
FINETUNE_FIELDS = (*TRAINING_FIELDS, "block_size")


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint beside the weights (latest.pt and ckpt_<iter>.pt also
    hold the optimizer, scaler and RNGs) and restored by --resume."""

    iter_num: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    elapsed: float = 0.0  # training seconds before this process started (a resumed run adds on)
    evaluated: bool = False  # iter_num's evaluation is done: a resumed run does not repeat it
    rng: dict | None = None  # this rank's RNG states to restore (see _rng_state); None: seed them

    @classmethod
    def resumed(cls, start: dict, rank: int) -> TrainState:
        rngs = start["rng"]
        return cls(start["iter"], start["best_val_loss"], start["elapsed"], start["evaluated"],
                   rngs[rank] if rank < len(rngs) else None)

    def saved(self, elapsed: float, rngs: list[dict] | None = None) -> dict:
        """Checkpoint keys; `rngs` (every rank's, index = rank) makes it resumable."""
        d = {"iter": self.iter_num, "best_val_loss": self.best_val_loss, "elapsed": elapsed}
        return d if rngs is None else d | {"evaluated": self.evaluated, "rng": rngs}


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop at the next safe point, save latest.pt, exit."""


def train(cfg: TrainConfig, model_cfg: ModelConfig | None = None) -> Path:
    """Train on `cfg.data` into `cfg.out`; returns the output directory.

    `model_cfg` replaces the preset as the base of a fresh model (the vocabulary always comes from
    the data). Under torchrun every rank calls this; rank 0 alone logs and writes files."""
    d = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, model_cfg, d).run()
    finally:
        distributed.teardown(d)


class Trainer:
    """One training run: `__init__` builds everything (nothing is written yet), `run` is the loop."""

    def __init__(self, cfg: TrainConfig, base_cfg: ModelConfig | None, d: distributed.Dist):
        self.cfg, self.d, self.out, self.device = cfg, d, Path(cfg.out), d.device
        self.say = print if d.is_master else (lambda *a, **k: None)

        # ------------------------------------------------------------ data
        meta = load_meta(cfg.data)
        self.train_data, self.val_data = open_tokens(cfg.data, "train"), open_tokens(cfg.data, "val")
        self.tokenizer = load_tokenizer(cfg.data)
        # UTF-8 bytes each id spells (0 for the template's special tokens): val_bpb's denominator
        self.token_bytes = torch.from_numpy(self.tokenizer.token_bytes()).to(self.device)

        # ------------------------------------------------- where we start from
        start, self.source = _starting_point(cfg, self.out, self.tokenizer)
        self.model_cfg = _model_config(cfg, base_cfg, start, self.source, pad_vocab(meta["tokenizer"]["vocab_size"]))
        self.T = cfg.block_size or self.model_cfg.block_size
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            if len(data) <= self.T + 1:
                raise StoryseekError(f"{cfg.data}: the {split} split has {len(data):,} tokens, too few for "
                                     f"--block-size {self.T}; lower --block-size or prepare more data")
        self.dtype, self.dtype_why = _agreed_dtype(cfg.dtype, self.device, self.model_cfg, cfg.batch_size * self.T, d)
        _check_memory(cfg, self.model_cfg, self.T, self.device, self.dtype)

        # ------------------------------------------------------------ model
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = Transformer(self.model_cfg)
        if start is not None:
            _load_weights(self.raw_model, start["model"], self.source)
        self.raw_model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        if self.device.type == "cpu":
            keep_freed_memory()  # each step's temporaries reused, not faulted in page by page
        self.ctx = autocast(self.device, self.dtype)

        # ------------------------------------------- optimizer and progress
        self.optimizer = configure_optimizer(self.raw_model, cfg.learning_rate, cfg.weight_decay,
                                             (cfg.beta1, cfg.beta2), self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.state = TrainState()
        if cfg.resume:
            self.optimizer.load_state_dict(start["optimizer"])
            self.scaler.load_state_dict(start["scaler"])
            self.state = TrainState.resumed(start, d.rank)
        _seed_or_restore(cfg.seed + d.rank, self.state.rng, self.device)
        self.train_batches = RandomWindows(self.train_data, cfg.batch_size, self.T, self.device, cfg.seed + d.rank,
                                           self.state.rng["sampler"] if self.state.rng else None)
        del start
        compile, self.compile_why = resolve_compile(cfg.compile, self.device, d.world_size)
        self.compile_later = compile is None  # auto on a CPU: the first iterations' speed decides (step)
        self.compile = bool(compile)
        if self.compile:
            require_compiler(self.device)
        self.graphs, graphs_why = resolve_train_graphs(cfg.cuda_graphs, self.compile, self.device, d.world_size)
        self.compile_why += f", {graphs_why}" if graphs_why else ""
        self.step_seconds: list[float] = []  # eager iterations timed while compile_later
        self._build_model()
        if self.graphs:
            allocate_gradients(self.raw_model)

        # ------------------------------------------------- what we report
        self.tokens_per_iter = cfg.batch_size * self.T * cfg.grad_accum * d.world_size
        params = count_parameters(self.model_cfg)
        self.flops_per_iter = flops_per_token(self.model_cfg, self.T, params["active"], params["mtp"]) * self.tokens_per_iter
        peak = gpu_peak_flops(self.device)
        self.peak_flops = peak * d.world_size if peak else None
        self.stats = _Interval(self.model_cfg, self.device)
        self.stop = _StopSignals()
        self.lr = cfg.learning_rate  # set by the schedule before every step
        self.t0 = self.t_interval = time.time()  # restarted by run(): the start, and the last evaluation
        self.first_iter, self.iters_interval = self.state.iter_num, 0
        self.latest_iter: int | None = None  # the iteration latest.pt was last written at by this run
        if d.is_master:
            self._announce(params)
        self.log = MetricsLog(self.out, self.state.iter_num if cfg.resume else None, cfg.tensorboard, cfg.wandb,
                              cfg.wandb_project, {**cfg.to_dict(), "model_config": self.model_cfg.to_dict()}
                              ) if d.is_master else None

    def _build_model(self) -> None:
        """What the step and the evaluation call: eager, or compiled under self.compile. Evaluation's
        forward is an inference graph of its own, without CUDA graphs: 400 forwards per 1,000 steps at
        the defaults, which on a 2-core CPU ran 1.26x faster compiled for the tiny preset and 1.11x for
        the default one (its chunked head dominates)."""
        self.model = _wrap(self.raw_model, self.compile, self.graphs, self.d)
        self.eval_nats = torch.compile(self._eval_nats) if self.compile else self._eval_nats

    def _compile_if_it_pays(self) -> None:
        """auto on a CPU, once COMPILE_PROBE_ITERS iterations ran eagerly: compile the rest of the run
        if their speed says it pays (device.compile_pays). The median of the later half: the first
        iterations warm up."""
        cfg = self.cfg
        self.compile_later = False
        step_s = statistics.median(self.step_seconds[len(self.step_seconds) // 2:])
        seconds_left = 60 * cfg.max_minutes - (time.time() - self.t0) if cfg.max_minutes > 0 else None
        self.compile, why = compile_pays(step_s, cfg.max_iters - self.state.iter_num, seconds_left)
        if self.compile and (error := compiler_error(self.device)):
            self.compile, why = False, f"{why}, but torch.compile cannot build kernels here ({error})"
        if not self.compile:
            self.say(f"torch.compile stays off ({why})")
            return
        self.say(f"torch.compile on from iter {self.state.iter_num} ({why}): the next iteration waits for the compiling")
        self._build_model()

    def _announce(self, params: dict) -> None:
        cfg, d = self.cfg, self.d
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"training {params['total'] / 1e6:.2f}M parameters ({params['active'] / 1e6:.2f}M active "
                 f"non-embedding) on {self.device}" + (f" x {d.world_size} ranks" if d.enabled else "")
                 + f", {self.dtype_why}")
        self.say(f"{self.tokens_per_iter:,} tokens per iteration (batch {cfg.batch_size} x block {self.T} x "
                 f"grad_accum {cfg.grad_accum} x {d.world_size} ranks); data {cfg.data}: "
                 f"{len(self.train_data):,} train tokens")
        self.say(f"torch.compile {self.compile_why}" + (": the first evaluation and the first iteration wait for the compiling" if self.compile else ""))
        if cfg.resume:
            self.say(f"resuming from {self.source} at iter {self.state.iter_num}")
        elif cfg.init_from:
            self.say(f"initialized from {cfg.init_from}")

    # ------------------------------------------------------------------------------------- the loop
    def run(self) -> Path:
        d, state = self.d, self.state
        self.t0 = self.t_interval = time.time()
        self.first_iter, self.iters_interval = state.iter_num, 0
        try:
            with self.stop:
                try:
                    self._loop()
                except Interrupted:
                    self.stats.check_finite(state.iter_num, self.out)
                    if self.latest_iter != state.iter_num:  # else latest.pt already holds exactly this state
                        self.save(LATEST, full=True)
                    self.say(f"interrupted at iter {state.iter_num}: saved {self.out / LATEST}; continue with --resume")
                    raise KeyboardInterrupt from None
        finally:
            self.stats.close_progress()
            if self.log is not None:
                self.log.close()
        if d.is_master:
            png = plot_metrics(self.out / METRICS_CSV)
            self.say(f"done: {state.iter_num} iters, best val_loss {state.best_val_loss:.4f}; "
                     f"wrote {self.out / FINAL}, {png}")
        return self.out

    def _loop(self) -> None:
        """Steps until max_iters or --max-minutes, evaluating and saving on the way; then the last
        evaluation and final_model.pt. Raises Interrupted at the first check after a stop signal."""
        cfg, d, state = self.cfg, self.d, self.state
        decay_iters = cfg.lr_decay_iters or cfg.max_iters
        while True:
            # Under --max-minutes the schedule follows whichever budget is nearer its end, so a
            # time-bounded run (the demo) still anneals to min_lr instead of stopping at peak lr.
            progress = state.iter_num if cfg.max_minutes <= 0 else max(
                state.iter_num, (time.time() - self.t0) / (60 * cfg.max_minutes) * decay_iters)
            self.lr = lr_at(progress, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, decay_iters)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr

            if state.iter_num % cfg.eval_interval == 0 and not state.evaluated:
                self.evaluate()
                self.save(LATEST, full=True)
                if self.stop.any_rank(d):  # a signal during those saves: do not start another one
                    raise Interrupted
            if cfg.checkpoint_interval and state.iter_num % cfg.checkpoint_interval == 0 and state.iter_num > self.first_iter:
                self.stats.check_finite(state.iter_num, self.out)
                self.save(f"ckpt_{state.iter_num}.pt", full=True)

            timed_out = cfg.max_minutes > 0 and time.time() - self.t0 > 60 * cfg.max_minutes
            if not d.enabled or state.iter_num % cfg.log_interval == 0:  # (under DDP a collective: not every step)
                if self.stop.any_rank(d):
                    raise Interrupted
                if distributed.any_rank(timed_out, d) and state.iter_num < cfg.max_iters:
                    self.say(f"--max-minutes {cfg.max_minutes:g} reached at iter {state.iter_num}")
                    break
            if state.iter_num >= cfg.max_iters:
                break
            self.step()

        if not state.evaluated:
            self.evaluate()
        self.save(FINAL, full=False)
        self.save(LATEST, full=True)

    def step(self) -> None:
        """One optimizer step: grad_accum micro-steps, clip, AdamW, then the MoE bias update."""
        cfg, d = self.cfg, self.d
        started = time.perf_counter()
        for micro in range(cfg.grad_accum):
            if d.enabled:  # all-reduce gradients only on the last micro-step
                self.model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            x, y = next(self.train_batches)  # (it reads the following batch ahead, overlapping the device)
            if self.graphs:  # a new replay: the last one's outputs (o, its loss) are read and done with
                torch.compiler.cudagraph_mark_step_begin()
            with self.ctx:
                o = self.model(x, y)
            self.scaler.scale(o.loss / cfg.grad_accum).backward()
            self.stats.add_losses(o)
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.stats.grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=not self.graphs)
        if self.stats.has_moe:
            load = distributed.all_reduce_sum(self.raw_model.expert_load(), d)  # [n_moe_layers, E]
            self.stats.load += load
            self.raw_model.update_expert_bias(load)
        self.state.iter_num += 1
        self.iters_interval += 1
        self.state.evaluated = False
        if self.compile_later:
            self.step_seconds.append(time.perf_counter() - started)
            if len(self.step_seconds) == COMPILE_PROBE_ITERS:
                self._compile_if_it_pays()
        if self.state.iter_num % cfg.log_interval == 0:
            self.stats.check_finite(self.state.iter_num, self.out)
            tokens_per_sec = self.tokens_per_iter * self.iters_interval / (time.time() - self.t_interval)
            self.stats.progress(self.state.iter_num, cfg.eval_interval, tokens_per_sec, d.is_master)

    # ---------------------------------------------------------------------------- evaluation, saving
    def evaluate(self) -> None:
        """Losses on both splits, the console lines and CSV row, best_model.pt when val improved."""
        state, iters = self.state, self.iters_interval
        self.stats.check_finite(state.iter_num, self.out)
        dt = time.time() - self.t_interval
        losses = self.estimate_loss()
        speed = self.tokens_per_iter * iters / dt if iters else None
        mfu = self.flops_per_iter * iters / dt / self.peak_flops if self.peak_flops and iters else None
        _report(self.log, state.iter_num, losses, self.lr, self.elapsed(), self.stats, speed, mfu, self.device,
                self.out, self.say)
        if state.iter_num > 0 and losses["val"] < state.best_val_loss:
            state.best_val_loss = losses["val"]
            self.save(BEST, full=False)
        state.evaluated = True
        self.t_interval, self.iters_interval = time.time(), 0

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean next-token loss per split over eval_iters batches per rank (the same batches every
        evaluation, so successive numbers compare), averaged over ranks. No MTP: runs compare.
        Also val_bpb, validation bits per byte as `storyseek eval` defines it (special tokens are
        context only): nats of the text tokens / (ln 2 x the bytes they spell), comparable across tokenizers.
        A stop signal is checked after every batch (with all ranks, so they leave together)."""
        cfg, d = self.cfg, self.d
        self.raw_model.eval()
        losses = {}
        try:
            for i, (split, data) in enumerate((("train", self.train_data), ("val", self.val_data))):
                batches = RandomWindows(data, cfg.batch_size, self.T, self.device, seed=10_000 * (i + 1) + d.rank)
                total = torch.zeros(3, dtype=torch.float64, device=self.device)  # sum of mean losses, text nats, bytes
                for _ in range(cfg.eval_iters):
                    x, y = next(batches)
                    with self.ctx:
                        nats = self.eval_nats(x, y)  # [B*T]
                    nbytes = self.token_bytes[y.flatten()]
                    total += torch.stack([nats.mean(), nats[nbytes > 0].sum(), nbytes.sum()]).double()
                    if self.stop.any_rank(d):
                        raise Interrupted
                mean, nats, nbytes = distributed.all_reduce_sum(total, d).tolist()
                losses[split] = mean / (cfg.eval_iters * d.world_size)
                if split == "val":
                    losses["val_bpb"] = nats / (math.log(2) * nbytes) if nbytes else math.nan
        finally:
            self.raw_model.train()
        return losses

    def _eval_nats(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Next-token nats of every position: x, y [B, T] -> [B*T]. The head runs in chunks, so
        [B*T, vocab] logits never exist at once."""
        hidden = self.raw_model(x, last_only=True).hidden  # [B, T, D]
        return token_nats(self.raw_model.head, hidden.flatten(0, 1), y.flatten())

    def elapsed(self) -> float:
        return self.state.elapsed + time.time() - self.t0

    def save(self, name: str, full: bool) -> None:
        """Every rank calls this (the RNG gather is collective); rank 0 writes OUT/name.
        `full`: everything --resume needs (optimizer, scaler, RNGs), else the weights and progress."""
        state = {"model_config": self.model_cfg.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                 "model": self.raw_model.state_dict(), "train_config": self.cfg.to_dict()}
        rngs = _gather_rng(_rng_state(self.train_batches, self.device), self.d) if full else None
        state |= self.state.saved(self.elapsed(), rngs)
        if full:
            state |= {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        if self.d.is_master:
            save_checkpoint(self.out / name, state)
        if name == LATEST:
            self.latest_iter = self.state.iter_num


# --------------------------------------------------------------------------------------- setup helpers


def _starting_point(cfg: TrainConfig, out: Path, tokenizer: Tokenizer) -> tuple[dict | None, str | None]:
    """(checkpoint dict, where it came from): OUT/latest.pt for --resume, the --init-from weights, or
    (None, None) for a fresh model, which refuses an OUT that already holds a run."""
    resume_path = out / LATEST
    if cfg.resume:
        start, source = load_checkpoint(resume_path), str(resume_path)
    elif cfg.init_from:
        start, source = load_pretrained(cfg.init_from), str(cfg.init_from)
    else:
        if resume_path.exists():
            raise StoryseekError(f"{out} already holds a training run ({LATEST}): add --resume to continue it, "
                                 "or choose another --out")
        return None, None
    if start.get("tokenizer") and start["tokenizer"]["spec"] != tokenizer.spec:
        raise StoryseekError(f"{source} was trained with the {start['tokenizer']['spec']} tokenizer but {cfg.data} "
                             f"uses {tokenizer.spec}: train on data prepared with the same tokenizer")
    return start, source


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


def _check_memory(cfg: TrainConfig, model_cfg: ModelConfig, T: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before anything is allocated or written, a step that cannot fit in free RAM / GPU memory."""
    step = train_step_bytes(model_cfg, cfg.batch_size, T, device, activation_bytes=dtype.itemsize)
    check_fits(step, device, f"a training step of --batch-size {cfg.batch_size} x --block-size {T} "
               f"({model_cfg.n_layer} layers x {model_cfg.n_embd}, vocabulary {model_cfg.vocab_size:,})",
               "lower --batch-size or --block-size (--grad-accum keeps the tokens per step)", local_processes())


def _load_weights(model: Transformer, state_dict: dict, source: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise StoryseekError(f"{source}: its weights do not fit this model ({first})") from None


def _agreed_dtype(name: str, device: torch.device, model_cfg: ModelConfig, tokens: int,
                  d: distributed.Dist) -> tuple[torch.dtype, str]:
    """--dtype for this run: auto on a CPU times the head's and an expert's matmuls at this batch.
    Ranks measure apart, so bf16 only where every rank found it faster: they must train alike."""
    shapes = [(tokens, model_cfg.n_embd, model_cfg.vocab_size), (tokens, model_cfg.n_embd, model_cfg.moe_inter_dim)]
    dtype, why = resolve_dtype(name, device, shapes)
    if name == "auto" and distributed.any_rank(dtype != torch.bfloat16, d) and dtype == torch.bfloat16:
        return torch.float32, f"{why}, but not on every rank: float32"
    return dtype, why


def _wrap(model: Transformer, compile: bool, graphs: bool, d: distributed.Dist) -> torch.nn.Module:
    """What the training step calls: the model, compiled (--compile; as CUDA graphs: --cuda-graphs),
    inside DDP (torchrun)."""
    if compile:
        model = torch.compile(model, mode="reduce-overhead" if graphs else None)
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Buffers are not re-broadcast each forward: each rank's expert-load counts must stay its own
    # until the all-reduce, and the biases stay equal because every rank applies the same update.
    # Every parameter gets a gradient every step (the MoE dispatch gives each expert one, if zero,
    # even when it receives no tokens), so DDP need not search the graph for unused ones.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
               **no_sync)


# --------------------------------------------------------------------------------- signals and RNGs


class _StopSignals:
    """Inside `with`: SIGINT / SIGTERM only raise a flag (the loop saves latest.pt at its next check);
    a second signal raises KeyboardInterrupt at once, for a user who will not wait for the save."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def any_rank(self, d: distributed.Dist) -> bool:
        """Whether any rank was signalled (collective under DDP: every rank must call it together)."""
        return distributed.any_rank(self.signum is not None, d)


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


# ------------------------------------------------------------------------------------------ reporting


class _Interval:
    """Training-side numbers between two evaluations: loss parts, expert load, grad norm, a progress bar."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.device = device
        n_moe = cfg.n_moe_layers + cfg.mtp_depth * (cfg.ffn == "moe")  # the MTP block is MoE unless all is dense
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
           "val_bpb": round(losses["val_bpb"], 6),
           "learning_rate": lr, "elapsed_time": round(elapsed, 2), "gpu_memory_gb": round(gpu_memory_gb(device), 3),
           "tokens_per_sec": round(tokens_per_sec, 1) if tokens_per_sec else None,
           "mfu": round(mfu, 4) if mfu is not None else None, "ram_gb": round(ram_gb(), 3), **stats.take()}
    say(console_line(iter_num, losses["train"], losses["val"], lr, elapsed, losses["val_bpb"]))
    say(detail_line(row, device))
    if log is not None:
        log.log(row)
    return row
